"""--bf16 under FSDP: what a rank holds after a forward, autocast over fp32 units (before) against FSDP's mixed
precision (lib/fsdp.py's shard and autocast, now). Two gloo ranks on CPU, a Qwen3-VL text model of 64M parameters
(256 MB fp32, a 128 MB bf16 copy); resident memory with glibc returning freed blocks (MALLOC_MMAP_THRESHOLD_).

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/bench_fsdp_bf16.py
"""
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import fsdp  # noqa: E402


def model(bf16):
    """The text model, sharded per decoder layer as fsdp.shard does (with FSDP's mixed precision when bf16)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [12, 10, 10], "mrope_interleaved": True}
    torch.manual_seed(0)
    m = Qwen3VLTextModel(Qwen3VLTextConfig(hidden_size=1024, intermediate_size=3072, num_hidden_layers=6,
                                           num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=1000,
                                           rope_parameters=rope))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in m.layers:
        fully_shard(layer, mp_policy=policy)
    return fully_shard(m, mp_policy=policy)


def held(m, context, grad):
    """MB resident after a forward (still inside `context`, its output alive) over what was resident before."""
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2 ** 20
    x = torch.randn(1, 16, 1024)
    with torch.no_grad():
        m(inputs_embeds=x)  # lazy init, the allocator's first blocks
    before = rss()
    with torch.set_grad_enabled(grad), context:
        out = m(inputs_embeds=x).last_hidden_state
        after = rss() - before
    del out
    return after


def main():
    fsdp.init_distributed()
    for grad, phase in ((False, "no grad (generate, scoring, evaluation)"), (True, "with grad (until backward)")):
        before = held(model(False), torch.autocast("cpu", torch.bfloat16), grad)
        now = held(model(True), fsdp.autocast(SimpleNamespace(bf16=True), torch.zeros(1)), grad)
        if fsdp.rank() == 0:
            print(f"{phase}: autocast over fp32 units {before:.1f} MB held, FSDP mixed precision {now:.1f} MB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
