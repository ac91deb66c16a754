"""memory.estimate (the line every training script prints before its models load) against what autograd keeps and
what a run holds."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import grpo
from lib import memory
import opd
from conftest import REPO

BENCH = REPO / "tests" / "bench_real_dims.py"
sys.path.insert(0, str(BENCH.parent))
import bench_real_dims as bench  # noqa: E402  (its model builder, processor and one-step runner)


def saved_bytes(config, tokens, bf16):
    """Bytes of the tensors autograd keeps for backward in a Qwen3-VL text model's forward over `tokens`."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel
    model = Qwen3VLTextModel(config)
    storages = {}  # a tensor saved by several ops (or views of one) is held once

    def keep(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        model(inputs_embeds=torch.randn(1, tokens, config.hidden_size))
    return sum(storages.values())


def test_activation_sizes_are_what_autograd_keeps():
    """ACTIVATION's bytes per token and layer, at widths the fit did not use, fp32 and bf16: within 5%."""
    from transformers import Qwen3VLTextConfig
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [12, 10, 10], "mrope_interleaved": True}
    config = Qwen3VLTextConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=6,
                               num_key_value_heads=2, head_dim=64, vocab_size=64, rope_parameters=rope)
    config._attn_implementation = "sdpa"
    for bf16 in (False, True):
        measured = (saved_bytes(config, 512, bf16) - saved_bytes(config, 256, bf16)) / 256 / 2
        counted = memory.layer_activations(1, 384, 1024, 6 * 64, 2 * 64, bf16)
        assert abs(measured - counted) / counted < 0.05, (bf16, measured, counted)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """A student (4 text layers) and a teacher (2) of real Qwen3-VL structure at reduced widths with the real
    vocabulary, and one query on a real-length video (the Charades clip, or a synthetic one of its size)."""
    folder = tmp_path_factory.mktemp("reduced")
    text = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                rope_parameters=bench.ROPE | dict(mrope_section=[12, 10, 10]))
    vision = dict(hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512)
    small = dict(text=bench.REAL_2B["text"] | text, vision=bench.REAL_2B["vision"] | vision, tie_word_embeddings=True)
    processor = bench.make_processor(str(folder / "processor"))
    paths = {"data": bench.make_data(str(folder)), "folder": folder}
    for name, layers in (("student", 4), ("teacher", 2)):
        paths[name] = str(folder / name)
        bench.build_model(paths[name], small, layers, 1, processor)
    return paths


@pytest.mark.parametrize("script, lora", [("opd.py", 0), ("grpo.py", 0), ("opd.py", 8)])
def test_estimate_is_within_15_percent_of_a_measured_step(reduced, script, lora):
    """One step (no gradient checkpointing, so activations are a large part; GRPO: 4 rollouts in grouped_logits'
    packed rows; --lora-rank: adapters only) on a real-length video: the process's peak resident memory over what it
    held before loading a model vs the estimate the run itself printed."""
    cls, frozen, group = (opd.Args, [reduced["teacher"]], 1) if script == "opd.py" else (grpo.GRPOArgs, [], 4)
    own = dict(teacher=reduced["teacher"], loss="sampled") if script == "opd.py" else dict(group_size=group)
    own |= dict(lora_rank=lora) if lora else {}
    args = cls(student=reduced["student"], data=reduced["data"], out=str(reduced["folder"] / f"{script[:-3]}{lora}"),
               steps=1,
               prompts_per_step=1, micro_batch=1, max_new_tokens=16, num_workers=0, **own)
    names = ["student", "data", "out", "steps", "prompts_per_step", "micro_batch", "max_new_tokens", "num_workers"]
    names += list(own)
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in names]
    measured_json = reduced["folder"] / f"{script}{lora}.measured.json"
    subprocess.run([sys.executable, str(BENCH), "--child", script, str(measured_json), *flags], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL, env=os.environ | bench.LIVE_MEMORY)
    rss = json.loads(measured_json.read_text())
    measured = (max(rss["peak_rss_mb"].values()) - rss["start_rss_mb"]) * 2 ** 20
    estimated = memory.estimate(args, frozen, group, cuda=False, first_step=True)
    assert rss["estimate_mb"]["peak"] == round(estimated["peak"] / 2 ** 20)  # what the run printed
    assert 0.85 < measured / estimated["peak"] < 1.15, (measured / memory.GB, memory.line(estimated))


def test_a_gpu_with_less_free_memory_is_refused_unless_forced(tiny, monkeypatch, capsys):
    """With a CUDA device whose free memory is below the estimate: one line naming both, and --force runs on. Free
    memory above the counted peak but below it plus the allowance (the CUDA context, fragmentation) is refused too."""
    import data
    args = opd.Args(student=tiny["student"], teacher=tiny["teacher"], data=tiny["train"], max_new_tokens=24)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (2 ** 20, 80 * 2 ** 30))  # 1 MiB free
    refused = r"needs about .* GiB per GPU \(counted .*\), this GPU has 0.0 GiB free.*--force"
    with pytest.raises(data.DataError, match=refused):
        memory.check(args, [args.teacher])
    args.force = True
    parts = memory.check(args, [args.teacher])
    assert parts["peak"] > 2 ** 20 and "estimated peak" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * 2 ** 30, 80 * 2 ** 30))
    args.force = False
    assert memory.check(args, [args.teacher])["peak"] < 80 * 2 ** 30  # the miniature fits
    extra = memory.allowance(parts)
    assert extra >= memory.CONTEXT
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(parts["peak"] + extra / 2), 80 * 2 ** 30))
    with pytest.raises(data.DataError, match="for the CUDA context, NCCL and fragmentation"):
        memory.check(args, [args.teacher])


def test_the_longest_prompt_is_found_by_tokens_not_by_duration(tmp_path):
    """A 6 s 1280x720 clip makes more tokens than a 20 s 320x180 one. Before, the estimate encoded the longest video
    by the annotations' durations (here the low-resolution one; a Charades-STA txt file gives no durations at all)."""
    import av
    import numpy as np
    import data

    def clip(name, seconds, width, height):
        path = str(tmp_path / name)
        with av.open(path, "w") as out:
            stream = out.add_stream("libx264", rate=4)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            rng = np.random.default_rng(0)
            for _ in range(4 * seconds):
                frame = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
                for pkt in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(pkt)
            for pkt in stream.encode():
                out.mux(pkt)
        return path
    small, large = clip("long_small.mp4", 20, 320, 180), clip("short_720p.mp4", 6, 1280, 720)
    train = str(tmp_path / "train.jsonl")
    data.write_jsonl([data.Sample(small, "q", (1.0, 2.0), 20.0, "a"), data.Sample(large, "q", (1.0, 2.0), 6.0, "b")],
                     train)
    processor = bench.make_processor(str(tmp_path / "student"))  # real Qwen3-VL video settings, as saved below
    processor.save_pretrained(str(tmp_path / "student"))
    args = SimpleNamespace(data=train, video_root=None, skip_bad=False, fps=2.0, max_frames=768,
                           student=str(tmp_path / "student"))
    tokens = {}
    for path in (small, large):
        (sample,) = [s for s in data.load_annotations(train) if s.video == path]
        tokens[path] = data.encode(processor, [sample], data.load_videos([sample])[0])["input_ids"].shape[1]
    assert tokens[large] > tokens[small]
    assert memory.prompt_size(args, candidates=1)[0] == tokens[large]


def test_the_kv_cache_is_counted_in_the_dtypes_it_has(tiny):
    """bf16 autocast over the student's fp32 weights keeps fp32 keys (Qwen3's fp32 k_norm weight and the rope promote
    them) beside bf16 values: 1.5x a bf16 cache, as kv_cache counts it for generation in one process; bf16 weights
    (a loaded teacher, FSDP's mixed precision) keep both in bf16."""
    import data
    import rollout
    model, processor = rollout.load_model(tiny["student"])
    samples = data.load_annotations(tiny["test"])[:2]
    batch = data.encode(processor, samples, data.load_videos(samples)[0])
    size = memory.model_size(tiny["student"])
    rows, tokens = batch["input_ids"].shape

    def measured(m, autocast):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            cache = m(**batch, use_cache=True).past_key_values
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert measured(model, True) == memory.kv_cache(size, rows, tokens, 4, 2)
    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(torch.bfloat16)
    assert measured(model.to(torch.bfloat16), False) == memory.kv_cache(size, rows, tokens, 2, 2)
