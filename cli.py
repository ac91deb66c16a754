"""The command line and the run folder, shared by the training scripts (opd.py, grpo.py, tvdf.py, dpo.py, ...).

    args = cli.parse(Args, MINIATURE)      # flags from a dataclass; the miniature's values when no models are named
    cli.start_run(args)                    # every input checked, the miniature built, --out made safe to write
    ... cli.open_run / cli.write / cli.save / cli.stop_on_signal   # opd.train: resume, log.jsonl, checkpoints, Ctrl-C

Everything a user can get wrong is refused here, as one line and exit code 2 (data.run), before a model loads or
--out is touched: a flag's range or choice, a model path, the annotations and their videos, a finished run in --out.
"""
import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import re
import shutil
import signal
import sys

import torch
from tqdm import tqdm

import data
import fsdp
import memory
import rollout
import toy


def parse(cls, miniature, drop=(), choices=None, bounds=None):
    """Command line -> cls instance: every dataclass field but `drop` is a flag, its --help line the comment beside
    the field; the miniature's values fill in what the user did not give when every model/data named (if any) is
    part of the miniature (of_miniature).

    choices: {field: allowed values} (a typo must not fall back to a default); bounds: {field: (low, inclusive)}.
    Bad values are a DataError before anything runs.
    """
    helps = {}  # a field's comment, with the comment lines right under it
    for c in reversed(cls.__mro__[:-1]):
        for name, first, more in re.findall(r"^    (\w+): .*?#\s*(.*)$((?:\n    #\s.*)*)", inspect.getsource(c), re.M):
            helps[name] = " ".join([first] + [line.strip("# ") for line in more.splitlines() if line.strip()])
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = data.refuse  # one line, not the whole usage
    fields = [f for f in dataclasses.fields(cls) if f.name not in drop]
    for f in fields:
        default = f"default: {f.default}" if f.name not in miniature else \
            f"default: {miniature[f.name]} on the miniature, {f.default} with --student/--data"
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(
            type=f.type if f.type in (int, float) else str, choices=(choices or {}).get(f.name))
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                       help=f"{helps.get(f.name, '')} ({default})", **kind)
    given = vars(p.parse_args())
    for name, value in given.items():
        low, inclusive = (bounds or {}).get(name, (None, True))
        if low is not None and (value < low or (value == low and not inclusive)):
            raise data.DataError(f"--{name.replace('_', '-')} must be {'>=' if inclusive else '>'} {low} (got {value})")
    # the miniature's settings unless a named model or data file is not part of it (its weaker teacher or noisy pool
    # keep them; a real checkpoint, or another folder, gets the paper's)
    on_miniature = all(of_miniature(given[k]) for k in ("student", "teacher", "data") if given.get(k))
    args = cls(**{**(miniature if on_miniature else {}), **given})
    names = {f.name for f in fields}
    settings = ", ".join(f"{k.replace('_', ' ')} {getattr(args, k)}" for k in (
        "steps", "lr", "loss", "prompts_per_step", "group_size", "max_new_tokens") if k in names)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once
        print(("miniature: " if on_miniature else "paper defaults where not given: ") + settings)
    return args


def of_miniature(path):
    """Whether a model folder or annotation file is part of the shipped miniature, or of its rebuild in runs/toy."""
    return any(os.path.abspath(path).startswith(os.path.abspath(out) + os.sep) for out in (toy.MINIATURE, toy.REBUILD))


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
        paths = toy.build(toy.MINIATURE)
        if fsdp.rank() == 0:
            fsdp.barrier()
        args.student = args.student or paths["student"]
        args.teacher = args.teacher or paths["teacher"]
        args.data = args.data or paths["train"]
        args.eval_data = getattr(args, "eval_data", None) or paths["test"]
    return args


def checkpoint_step(out):
    """The optimizer steps the checkpoint in run folder `out` has trained (its step.json; nothing else is read)."""
    with open(f"{out}/checkpoint/step.json") as f:
        return json.load(f)["step"]


def start_run(args, models=("student", "teacher"), frozen=None):
    """Everything that can be wrong with a run's inputs, checked before a model loads or --out is touched:
    the models named, the annotations and their videos, the memory the run needs (memory.check: printed, and
    refused when a GPU has less free), and the run folder (an earlier run in --out is refused unless --resume
    continues it or --overwrite replaces it). frozen: the inference-only models the script loads, each a flag
    naming one, or (flag, bytes per weight) (default: the teacher, when the script has one)."""
    check_models(args, models)  # what the user named, before the miniature fills in the rest (built once)
    resolve_miniature(args)
    for flag in models:
        if not getattr(args, flag):
            raise data.DataError(f"--{flag} is needed with your own --student / --data")
    data.load_samples(args.data, args.video_root, args.skip_bad)
    if args.eval_data:
        data.load_samples(args.eval_data, args.video_root, args.skip_bad)
    frozen = ("teacher",) if frozen is None and "teacher" in models else frozen or ()
    paths = [(getattr(args, f[0]), f[1]) if isinstance(f, tuple) else getattr(args, f) for f in frozen]
    memory.check(args, paths, getattr(args, "group_size", getattr(args, "rollouts_per_prompt", 1)))
    if getattr(args, "resume", False):
        if not os.path.exists(f"{args.out}/checkpoint/step.json"):
            raise data.DataError(f"--resume: no checkpoint in {args.out}/checkpoint")
        done = checkpoint_step(args.out)
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


# ----------------------------------------------------------------------------- the run folder while opd.train runs
def open_run(args, student, opt, sched):
    """The run folder at the start of train -> (first step, training wall-clock so far, log.jsonl open for writing,
    the log records kept). On --resume: the optimizer, scheduler and RNG from the checkpoint, and the log up to it
    (a killed run may have logged steps after the checkpoint)."""
    os.makedirs(args.out, exist_ok=True)
    start, wall, kept = 0, 0.0, []
    if args.resume:
        state = torch.load(f"{args.out}/checkpoint/state.pt", weights_only=False)
        fsdp.load_optimizer_state(student, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, wall = state["step"], state["wall"]
        if os.path.exists(f"{args.out}/log.jsonl"):
            kept = [r for r in map(json.loads, open(f"{args.out}/log.jsonl")) if r["step"] <= start]
    fsdp.barrier()  # every rank has read the old log before rank 0 rewrites it
    log = open(f"{args.out}/log.jsonl" if fsdp.rank() == 0 else os.devnull, "w")  # rank 0 logs for all
    log.writelines(json.dumps(r) + "\n" for r in kept)
    return start, wall, log, kept


def write(log, record):
    """One record as one line of log.jsonl, on disk at once (a killed run keeps what it logged)."""
    log.write(json.dumps(record) + "\n")
    log.flush()


def save(args, student, processor, opt, sched, step, wall):
    """A checkpoint plain transformers can load (student + processor) plus what --resume needs. Every rank calls
    it (gathering the shards is collective); rank 0 writes."""
    path = f"{args.out}/checkpoint"
    fsdp.save_model(student, processor, path)
    state = fsdp.optimizer_state(student, opt)
    if fsdp.rank() == 0:
        torch.save({"optimizer": state, "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                    "step": step, "wall": wall, "args": dataclasses.asdict(args)}, f"{path}/state.pt")
        with open(f"{path}/step.json", "w") as f:  # what --resume checks before loading anything
            json.dump({"step": step}, f)
    fsdp.barrier()  # nobody reads the checkpoint before rank 0 has written it


@contextlib.contextmanager
def stop_on_signal():
    """Inside: Ctrl-C or SIGTERM asks the loop to stop after this step (the yielded list gets the signal), a second
    Ctrl-C stops at once. The previous handlers come back on the way out, also when a step raises."""
    stop = []
    handler = functools.partial(_interrupt, stop)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(stop, signum, frame):
    """Signal handler of stop_on_signal: the first signal asks the loop to stop after this step, a second stops
    now."""
    if stop:
        raise KeyboardInterrupt
    stop.append(signum)
    tqdm.write("stopping after this step (Ctrl-C again to stop now)")
