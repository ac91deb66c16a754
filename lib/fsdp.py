"""Several processes: `torchrun --nproc_per_node N opd.py ...` (or grpo.py, tvdf.py, -m neighbours.visd, ...) with
PyTorch's FSDP2.

Each of the N copies shards the student and the teacher with `fully_shard` (every rank holds 1/N of each weight and
gathers a layer only while running it), takes its own 1/N of each step's prompts (`plan` in lib/run.py), and FSDP
averages the gradients. A plain `python opd.py` is rank 0 of 1 and none of this runs. On CPU the same path runs
with the gloo backend (tests/test_distributed.py).
"""
import atexit
import contextlib
import gc
import os
import sys

import torch
import torch.distributed as dist


def init_distributed():
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU), and leave it at exit; a no-op for one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        sys.excepthook = _noting_failure(sys.excepthook)
        atexit.register(_leave)


_failed = []  # an uncaught exception on this rank: it leaves without waiting for the others


def _noting_failure(hook):
    """sys.excepthook that notes the failure for _leave, then reports it as `hook` does."""
    def excepthook(*exc):
        _failed.append(True)
        hook(*exc)
    return excepthook


def _leave():
    """At exit, every rank waits for the others, then the process group is closed. A rank that returned first
    would otherwise tear down its connections while another still reads the last collective ("Connection reset
    by peer"), or abort in the teardown of a group still open. Then the collector frees the sharded models, which
    reference cycles keep alive until now: freed later, in the interpreter's own teardown, their tensors still held
    by gloo's work can abort the process ("terminate called without an active exception": once in CI; the cause
    pytorch/pytorch#179291 describes)."""
    if dist.is_initialized():
        if not _failed:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    """Wait for every rank (a no-op for a single process)."""
    if dist.is_initialized():
        dist.barrier()


def load_device():
    """Where to load weights: on CPU when sharding (fully_shard moves each rank's shard to its GPU), else the GPU."""
    return "cpu" if dist.is_initialized() or not torch.cuda.is_available() else "cuda"


def shard(model, bf16=False):
    """FSDP2 units: each transformer block (the classes transformers lists as `_no_split_modules`), then the rest.
    bf16 (--bf16): FSDP's mixed precision, in place of autocast (see autocast): each unit is gathered in bf16 and
    computes in bf16, the gradients are reduced in fp32 onto the fp32 shards."""
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = dist.device_mesh.init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # FSDP fixes which unit is the root at the first forward. transformers' generate runs the vision tower before
    # the model's forward, which would make a vision block a root of its own: fix the structure now instead.
    model._get_fsdp_state()._lazy_init()
    return model


@contextlib.contextmanager
def gathered(model):
    """Inside: an FSDP2 model's top-level weights gathered, for what runs parts of it outside its forward
    (generate's vision tower); nothing for a plain model."""
    if hasattr(model, "unshard"):
        model.unshard()
    try:
        yield
    finally:
        if hasattr(model, "reshard"):
            model.reshard()


def autocast(args, model):
    """bf16 autocast around the forward passes with --bf16 in one process, else a context that does nothing. Under
    FSDP the units compute in bf16 themselves (shard): autocast there would cast each gathered weight and keep the
    cast, in its cache or for backward, a bf16 copy of the whole model on every GPU (docs/results.md)."""
    return torch.autocast(model.device.type, torch.bfloat16, enabled=args.bf16 and not dist.is_initialized())


def save_model(model, processor, path):
    """save_pretrained of the gathered weights, from rank 0: a folder plain transformers loads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = None  # a single process saves its own weights
    if dist.is_initialized():  # gather the shards (every rank must call this)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        model.save_pretrained(path, state_dict=state)
        processor.save_pretrained(path)


def save_optimizer(model, opt, path):
    """The optimizer's state, keyed by parameter name, into the folder `path` with torch.distributed.checkpoint:
    every rank writes its own shard, nothing is gathered (AdamW's moments of an 8B student are 61 GiB)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path, no_dist=not dist.is_initialized())


def load_optimizer(model, opt, path):
    """A save_optimizer folder into `opt`: each rank reads only its own part, whatever number of ranks wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = {"optimizer": get_optimizer_state_dict(model, opt)}  # the shapes and shards to fill (AdamW's moments made)
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_optimizer_state_dict(model, opt, state["optimizer"])


def load_optimizer_state(model, opt, state):
    """A whole optimizer state of a checkpoint from before save_optimizer (state.pt's "optimizer")."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=dist.is_initialized()))


def gather(obj):
    """Every rank's `obj` (any picklable value) -> [obj of rank 0, rank 1, ...] on every rank; [obj] for one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values):
    """A list of floats, averaged over ranks (for the log: each rank saw 1/N of the step's rollouts)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return (t / world()).tolist()

