"""The command line of the training scripts (opd.py, grpo.py, tvdf.py, neighbours/...) and its checks.

    args = cli.parse(Args, MINIATURE)      # flags from a dataclass; the miniature's values when no models are named
    cli.start_run(args)                    # every input checked, the miniature built, --out made safe to write

Everything a user can get wrong is refused here, as one line and exit code 2 (data.run), before a model loads or
--out is touched: a flag's range or choice, a model path, the annotations and their videos, a finished run in --out.
"""
import argparse
import dataclasses
import inspect
import os
import re
import shutil
import sys
import typing
from dataclasses import dataclass

import data
import rollout
from lib import fsdp, lora, memory, miniature, run


@dataclass
class RunArgs:
    """The flags of a run that are not the method's: every training script's Args adds its own to these."""
    out: str = None                 # run folder: log.jsonl, checkpoint/, final/
    eval_data: str = None           # test annotations for periodic greedy evaluation (default: miniature test)
    video_root: str = None          # folder with the videos (default: each annotation file's folder)
    eval_every: int = 20            # greedy evaluation every N steps (0: only before and after)
    eval_limit: int = 0             # evaluate on the first N test queries only (0: all)
    eval_batch_size: int = 8        # queries per generate call in the periodic evaluation (split over the ranks)
    save_every: int = 50            # checkpoint every N steps, at the end, and on Ctrl-C / SIGTERM
    resume: bool = False            # continue the run in --out from its checkpoint
    overwrite: bool = False         # replace the run already in --out (without it or --resume: refused)
    skip_bad: bool = False          # train without samples whose video file is missing, and replace a video that
    #                                 cannot be decoded mid-run by another sample (else: refused, or the run ends)
    num_workers: int = 1            # DataLoader processes decoding the next steps' videos (0: in the main process)
    share_prompt: bool = True       # each video through each vision tower once per step, a group's prompt through
    #                                 the LLM once per forward (ours, same numbers; off: a copy per rollout)
    gradient_checkpointing: bool = False  # trade compute for activation memory (GPU users)
    bf16: bool = False              # bf16 compute (GPU users): autocast in one process, FSDP's mixed precision
    #                                 under torchrun (lib/fsdp.py)
    force: bool = False             # start even when the memory estimate exceeds the GPU's free memory (lib/memory.py)
    seed: int = 0                   # seeds prompt order, sampling and init
    lora_rank: int = 0              # train adapters of this rank on the language model's linear layers, every other
    #                                 weight frozen, in one process (lib/lora.py; ours: a peer's convenience, not the
    #                                 paper's full fine-tuning; raise --lr, e.g. 1e-4); 0: train every weight
    lora_alpha: float = 32.0        # the adapters' scale is alpha / rank (ms-swift's default 32)
    report_to: typing.Literal["none", "tensorboard", "wandb"] = "none"  # a live view of the run: each step's record
    #                                 and each evaluation, with a few answers (lib/live.py; ours, as cleanrl's)


# The numeric flags' lower bounds: (bound, True if the bound itself is allowed), for every script's flags of these
# names; a script passes its own to parse (bounds=) where a name means something else there.
BOUNDS = dict(steps=(1, True), prompts_per_step=(1, True), rollouts_per_prompt=(1, True), micro_batch=(1, True),
              lr=(0, False), warmup_steps=(0, True), weight_decay=(0, True), grad_clip=(0, False),
              temperature=(0, False), max_new_tokens=(1, True), kl_chunk=(1, True), fps=(0, False),
              max_frames=(2, True), num_workers=(0, True), eval_every=(0, True), eval_limit=(0, True),
              eval_batch_size=(1, True), save_every=(1, True), group_size=(1, True), ppo_epochs=(1, True),
              clip_eps=(0, False),
              rounds=(1, True), k=(1, True), pool=(0, True), teacher_samples=(1, True), epochs=(0, True),
              warmup_ratio=(0, True), lora_rank=(0, True), lora_alpha=(0, False))
# What only distillation uses: grpo.py and the scripts built on it leave these out of their command lines
DISTILLATION_ONLY = ("teacher", "loss", "rollouts", "rollouts_per_prompt", "kl_chunk")


def parse(cls, defaults, drop=(), bounds=None):
    """Command line -> cls instance: every dataclass field but `drop` is a flag (the script's own first, then
    RunArgs'), its --help line the comment beside the field; `defaults`, the miniature's values, fill in what the user
    did not give when every model/data named (if any) is part of the miniature (of_miniature).

    A Literal field takes one of its values (a typo must not fall back to a default); a numeric one its bound in
    BOUNDS, or in `bounds` {field: (low, inclusive)}. Bad values are a DataError before anything runs.
    """
    helps = {}  # a field's comment, with the comment lines right under it
    for c in reversed(cls.__mro__[:-1]):
        for name, first, more in re.findall(r"^    (\w+): .*?#\s*(.*)$((?:\n    #\s.*)*)", inspect.getsource(c), re.M):
            helps[name] = " ".join([first] + [line.strip("# ") for line in more.splitlines() if line.strip()])
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = data.refuse  # one line, not the whole usage
    run_flags = {f.name for f in dataclasses.fields(RunArgs)}
    fields = [f for f in dataclasses.fields(cls) if f.name not in drop]
    fields.sort(key=lambda f: f.name in run_flags)  # the method's flags first in --help
    bounds = BOUNDS | (bounds or {})
    for f in fields:
        default = f"default: {f.default}" if f.name not in defaults else \
            f"default: {defaults[f.name]} on the miniature, {f.default} with --student/--data"
        choices = typing.get_args(f.type) if typing.get_origin(f.type) is typing.Literal else None
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(
            type=f.type if f.type in (int, float) else str, choices=choices)
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                       help=f"{helps.get(f.name, '')} ({default})", **kind)
    given = vars(p.parse_args())
    for name, value in given.items():
        low, inclusive = bounds.get(name, (None, True))
        if low is not None and (value < low or (value == low and not inclusive)):
            raise data.DataError(f"--{name.replace('_', '-')} must be {'>=' if inclusive else '>'} {low} (got {value})")
    # the miniature's settings unless a named model or data file is not part of it (its weaker teacher or noisy pool
    # keep them; a real checkpoint, or another folder, gets the paper's)
    on_miniature = all(of_miniature(given[k]) for k in ("student", "teacher", "data") if given.get(k))
    args = cls(**{**(defaults if on_miniature else {}), **given})
    names = {f.name for f in fields}
    settings = ", ".join(f"{k.replace('_', ' ')} {getattr(args, k)}" for k in (
        "steps", "lr", "loss", "prompts_per_step", "group_size", "max_new_tokens") if k in names)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once
        print(("miniature: " if on_miniature else "paper defaults where not given: ") + settings)
    return args


def of_miniature(path):
    """Whether a model folder or annotation file is part of the shipped miniature, or of its rebuild in runs/toy."""
    return any(os.path.abspath(path).startswith(os.path.abspath(out) + os.sep) for out in (miniature.MINIATURE,
                                                                                   miniature.REBUILD))


def check_models(args, flags):
    """rollout.check_model for each of these flags the user gave."""
    for flag in flags:
        if getattr(args, flag):
            rollout.check_model(flag, getattr(args, flag))


def resolve_miniature(args):
    """Fill the shipped miniature's models and data into whatever the user did not give (built if it is missing)."""
    if not (args.student and args.data):  # real runs name their own models and data (grpo.py has no teacher)
        if fsdp.rank() > 0:
            fsdp.barrier()  # under torchrun rank 0 builds (or finds) the miniature while the others wait
        paths = miniature.build(miniature.MINIATURE)
        if fsdp.rank() == 0:
            fsdp.barrier()
        args.student = args.student or paths["student"]
        args.teacher = args.teacher or paths["teacher"]
        args.data = args.data or paths["train"]
        args.eval_data = getattr(args, "eval_data", None) or paths["test"]
    return args


def start_run(args, models=("student", "teacher"), frozen=None):
    """Everything that can be wrong with a run's inputs, checked before a model loads or --out is touched:
    the models named, the annotations and their videos, the memory the run needs (memory.check: printed, and
    refused when a GPU has less free), and the run folder (an earlier run in --out is refused unless --resume
    continues it or --overwrite replaces it). frozen: the inference-only models the script loads, each a flag
    naming one, or (flag, bytes per weight) (default: the teacher, when the script has one)."""
    check_models(args, models)  # what the user named, before the miniature fills in the rest (built once)
    if args.lora_rank and fsdp.world() > 1:
        raise data.DataError("--lora-rank trains adapters in one process (one GPU); under torchrun every weight "
                             "trains: leave --lora-rank out")
    resolve_miniature(args)
    for flag in models:
        if not getattr(args, flag):
            raise data.DataError(f"--{flag} is needed with your own --student / --data")
    samples = data.load_samples(args.data, args.video_root, args.skip_bad)
    if getattr(args, "epochs", 0):  # whole steps only: an epoch's last, smaller batch is left out
        if len(samples) < args.prompts_per_step:
            raise data.DataError(f"--epochs: {args.data} holds {len(samples)} samples, fewer than one step's "
                                 f"--prompts-per-step {args.prompts_per_step}")
        args.steps = args.epochs * (len(samples) // args.prompts_per_step)
    if args.eval_data:
        data.load_samples(args.eval_data, args.video_root, args.skip_bad)
    frozen = ("teacher",) if frozen is None and "teacher" in models else frozen or ()
    paths = [(getattr(args, f[0]), f[1]) if isinstance(f, tuple) else getattr(args, f) for f in frozen]
    memory.check(args, paths, getattr(args, "group_size", getattr(args, "rollouts_per_prompt", 1)))
    if getattr(args, "resume", False):
        if not os.path.exists(f"{args.out}/checkpoint/step.json"):
            raise data.DataError(f"--resume: no checkpoint in {args.out}/checkpoint")
        done = run.checkpoint_step(args.out)
        adapters = os.path.isdir(f"{args.out}/checkpoint/{lora.ADAPTER}")
        if adapters != bool(args.lora_rank):
            raise data.DataError(f"--resume: {args.out} was trained {'with' if adapters else 'without'} "
                                 "--lora-rank: resume it the same way")
        if done >= args.steps:  # nothing to train: the finished run stays as it is
            raise data.DataError(f"--resume: {args.out} has trained {done} of --steps {args.steps}; raise --steps "
                                 "to continue it")
    elif os.path.isdir(args.out) and os.listdir(args.out):
        if not args.overwrite:
            raise data.DataError(f"{args.out} already holds a run: --resume continues it, --overwrite replaces it, "
                                 "or choose another --out")
        if fsdp.rank() == 0:
            shutil.rmtree(args.out)
        fsdp.barrier()
    return args
