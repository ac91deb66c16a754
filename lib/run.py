"""The run around opd.train's loop: each step's prompts (prefetched), log.jsonl, the periodic evaluation,
checkpoints and --resume, Ctrl-C / SIGTERM, and the summary at the end. opd.train calls it like this:

    with run.Run(args, student, processor, opt, sched, samples, group) as loop:
        for step, prepared, timing in loop:                  # this rank's prompts of the step, decoded and encoded
            ...                                              # sample, score, update (the method)
            loop.end_step(step, rollouts, loss, grad_norm)   # log, evaluate, checkpoint, stop when asked
    loop.evals                                               # the evaluation records
"""
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import random
import shutil
import signal
import time

import torch
from tqdm import tqdm

import data
import eval as ev
from lib import fsdp, live, lora, share


class Run:
    """One opd.train call's run folder and schedule (the module's docstring shows the use)."""

    def __init__(self, args, student, processor, opt, sched, samples=None, group=1, frames=False):
        if args.prompts_per_step % fsdp.world():  # every rank must run the same number of micro-batches (FSDP)
            raise ValueError(f"--prompts-per-step {args.prompts_per_step} must divide by the {fsdp.world()} "
                             "processes")
        self.args, self.student, self.processor, self.opt, self.sched = args, student, processor, opt, sched
        self.samples = samples if samples is not None else data.load_samples(args.data, args.video_root,
                                                                             args.skip_bad)
        self.test, self.group, self.frames, self.stop = load_test(args), group, frames, []
        self.start, self.wall, self.log, kept = open_run(args, student, opt, sched)
        self.evals = [r for r in kept if "eval" in r]

    def __enter__(self):
        """The live view opened, and the evaluation before training (unless resumed). Ctrl-C or SIGTERM asks the loop
        to stop after this step, a second Ctrl-C stops at once."""
        handler = functools.partial(_interrupt, self.stop)
        self.previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.view = live.View(self.args, self.start)
        try:
            self.evals = self.evals or ([self.evaluate(self.start)] if self.test else [])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        """The previous signal handlers back, also when a step raised; the log and the live view closed."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.log.close()
        self.view.close()

    def __iter__(self):
        """(step, an iterator over this rank's prepared micro-batches, the step's timing dict) for each step left;
        then the final evaluation."""
        args = self.args
        upcoming = prefetch(args, self.processor, self.samples, self.group, self.start, self.frames)
        self.bar = tqdm(range(self.start, args.steps), desc=os.path.basename(args.out.rstrip("/")),
                        initial=self.start, total=args.steps, disable=fsdp.rank() > 0)
        for step, micro_batches in zip(self.bar, upcoming):
            self.t0, self.timing = time.time(), dict(generate=0.0, student=0.0, teacher=0.0)
            yield step, micro_batches, self.timing
        if self.test and (not self.evals or self.evals[-1]["step"] < args.steps):
            self.evals.append(self.evaluate(args.steps))

    def end_step(self, step, rollouts, loss, grad_norm):
        """After step `step`'s update: its record in log.jsonl, an evaluation and a checkpoint when due, and the
        stop a signal asked for (SystemExit, after the checkpoint)."""
        args, done = self.args, step + 1
        step_time = time.time() - self.t0
        self.wall += step_time
        record = step_record(done, self.wall, step_time, rollouts, loss, grad_norm, self.sched.get_last_lr()[0],
                             self.timing)
        write(self.log, record)
        self.view.step(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}", iou=f"{record['rollout_iou']:.3f}")
        if self.test and args.eval_every and done % args.eval_every == 0 and done < args.steps:
            self.evals.append(self.evaluate(done))
        if done % args.save_every == 0 or done == args.steps or self.stop:
            save(args, self.student, self.processor, self.opt, self.sched, done, self.wall)
        if self.stop:
            raise SystemExit(f"interrupted: checkpoint at step {done} in {args.out}/checkpoint; continue with --resume")

    def evaluate(self, step):
        """The student's greedy test metrics at `step`, logged and printed -> the record."""
        args, student = self.args, self.student
        student.eval()
        with fsdp.autocast(args, student):
            metrics, rows = ev.evaluate(student, self.processor, self.test, batch_size=args.eval_batch_size,
                                        fps=args.fps, max_frames=args.max_frames, desc=f"eval @{step}",
                                        num_workers=args.num_workers)
        student.train()
        record = {"step": step, "wall": round(self.wall, 2), "eval": metrics}
        write(self.log, record)
        self.view.evaluation(record, rows)
        tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
        return record


@contextlib.contextmanager
def timed(timing, key):
    """Adds the seconds spent inside to timing[key] (the step's split in log.jsonl)."""
    tic = time.time()
    try:
        yield
    finally:
        timing[key] += time.time() - tic


# ----------------------------------------------------------------------------- each step's prompts
def plan(args, samples, step):
    """This rank's prompts of one step: [(mb, [Sample])] per micro-batch, mb = the micro-batch's place in the
    whole step (the same under any number of ranks; it seeds the sampling). Random prompts each step, or with
    --epochs the step's share of its epoch's shuffled order."""
    n_step = min(args.prompts_per_step, len(samples))
    if getattr(args, "epochs", 0):
        epoch, i = divmod(step, len(samples) // n_step)
        order = random.Random(args.seed * 100_003 - epoch - 1).sample(range(len(samples)), len(samples))
        idx = order[i * n_step:(i + 1) * n_step]
    else:
        idx = random.Random(args.seed * 100_003 + step).sample(range(len(samples)), n_step)
    r, n = fsdp.rank(), fsdp.world()
    idx = idx[r * len(idx) // n:(r + 1) * len(idx) // n]  # this rank's share
    return [(r * len(idx) + i, [samples[j] for j in idx[i:i + args.micro_batch]])
            for i in range(0, len(idx), args.micro_batch)]


def prepare(args, processor, group, frames, samples, micro_batch):
    """One of plan's micro-batches -> (mb, samples, videos, prompt): the videos decoded (kept only with `frames`,
    for a `score` that re-encodes them, else None), the prompts encoded (pixels in bf16 under --bf16, as autocast
    would cast them), each repeated for its `group` rollouts (share.share: its video once). CPU work, run in a
    DataLoader worker while the model works on the micro-batch before it."""
    mb, chunk = micro_batch
    chunk, videos = decode(args, chunk, samples)
    prompt = data.encode(processor, chunk, videos)
    if args.bf16:
        prompt["pixel_values_videos"] = prompt["pixel_values_videos"].to(torch.bfloat16)
    repeat = share.share if args.share_prompt else share.expand
    return mb, chunk, videos if frames else None, repeat(prompt, group)


def decode(args, chunk, samples):
    """A micro-batch's videos, decoded -> (samples, videos). With --skip-bad a video that cannot be decoded is
    replaced by another of `samples` (drawn from the failed sample's id: the same on every run and rank), so that
    every rank keeps its micro-batch; without it, the DataError ends the run."""
    chunk = list(chunk)
    videos, _ = data.load_videos(chunk, args.skip_bad, args.fps, args.max_frames)
    for j in range(len(chunk)):
        draw, tries = random.Random(chunk[j].id), 0
        while videos[j] is None:
            if tries == 100:
                raise data.DataError(f"--skip-bad: 100 videos in a row cannot be decoded, e.g. {chunk[j].video}")
            print(f"{chunk[j].video}: cannot be decoded, replaced by another sample (--skip-bad)")
            chunk[j] = samples[draw.randrange(len(samples))]
            (videos[j],), _ = data.load_videos([chunk[j]], True, args.fps, args.max_frames)
            tries += 1
    return chunk, videos


def prefetch(args, processor, samples, group, start, frames=False):
    """The steps from `start` on, each an iterator over its prepared micro-batches (prepare). DataLoader workers
    decode and encode one micro-batch each, --num-workers of them ahead of the one in use, never whole steps: a
    prompt of a long 720p clip is hundreds of MB (with --num-workers 0, next() does the work itself)."""
    plans = [plan(args, samples, step) for step in range(start, args.steps)]
    loader = torch.utils.data.DataLoader([mb for micro_batches in plans for mb in micro_batches], batch_size=None,
                                         num_workers=args.num_workers, prefetch_factor=1 if args.num_workers else None,
                                         collate_fn=functools.partial(prepare, args, processor, group, frames,
                                                                      samples),
                                         worker_init_fn=_leave_signals_to_the_main_process)
    upcoming = iter(loader)
    return [itertools.islice(upcoming, len(micro_batches)) for micro_batches in plans]


def _leave_signals_to_the_main_process(worker_id):
    """A DataLoader worker ignores Ctrl-C and SIGTERM. torchrun and Slurm signal the whole process group: a worker
    killed first would end the run in the main process's next() before it saves. The main process saves, then its
    loader stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def load_test(args):
    """The test samples of train's periodic evaluation (the first --eval-limit of them), or None."""
    test = data.load_samples(args.eval_data, args.video_root, args.skip_bad) if args.eval_data else None
    return test[:args.eval_limit] if test and args.eval_limit else test


def step_record(step, wall, step_time, rollouts, loss, grad_norm, lr, timing):
    """The step's line of log.jsonl: loss, the reverse-KL estimate E[log pi_s - log pi_t] on the samples, the
    rollouts' IoU (GRPO's reward), grad norm, lr, throughput, the time split, and a variant's own "stats" (each
    the mean over the step's micro-batches and the ranks)."""
    tokens = sum(r["mask"].sum().item() for r in rollouts)
    kl = sum(((r["old_logp"] - r["scored"]["teacher_logp"]) * r["mask"]).sum().item()
             for r in rollouts if "teacher_logp" in r["scored"])
    ious = [x for r in rollouts for x in r["ious"]]
    variant = [r["scored"].get("stats", {}) for r in rollouts]  # a variant's own numbers (e.g. tempo.py's)
    names = sorted(variant[0])
    loss, kl, tokens, iou, *means = fsdp.mean_over_ranks([loss, kl, tokens, sum(ious) / len(ious)] + [
        sum(v[k] for v in variant) / len(variant) for k in names])
    kl, tokens = kl / max(tokens, 1), tokens * fsdp.world()
    times = {k: round(v, 3) for k, v in timing.items()}
    times["other"] = round(step_time - sum(timing.values()), 3)
    record = {"step": step, "wall": round(wall, 2), "loss": round(loss, 5), "kl": round(kl, 5),
              "rollout_iou": round(iou, 4), "grad_norm": round(grad_norm, 4), "lr": lr,
              "tokens_per_s": round(tokens / step_time, 1), "time": times}
    return record | {k: round(v, 4) for k, v in zip(names, means)}


# ----------------------------------------------------------------------------- the run folder
def checkpoint_step(out):
    """The optimizer steps the checkpoint in run folder `out` has trained (its step.json; nothing else is read)."""
    with open(f"{out}/checkpoint/step.json") as f:
        return json.load(f)["step"]


def open_run(args, student, opt, sched):
    """The run folder at the start of train -> (first step, training wall-clock so far, log.jsonl open for writing,
    the log records kept). On --resume: the optimizer, scheduler and RNG from the checkpoint, and the log up to it
    (a killed run may have logged steps after the checkpoint)."""
    os.makedirs(args.out, exist_ok=True)
    start, wall, kept = 0, 0.0, []
    if args.resume:
        state = torch.load(f"{args.out}/checkpoint/state.pt", weights_only=False)
        if "optimizer" in state:  # a checkpoint from before sharded optimizer states
            fsdp.load_optimizer_state(student, opt, state["optimizer"])
        else:
            fsdp.load_optimizer(student, opt, f"{args.out}/checkpoint/optimizer")
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
    """A checkpoint plain transformers can load (student + processor) plus what --resume needs. It is written whole
    to OUT/checkpoint-STEP/, then the link OUT/checkpoint moves to it in one step and the previous one is removed: a
    run killed mid-save keeps its previous checkpoint intact. Every rank calls it: the weights are gathered for rank
    0 to write (a collective), the optimizer state is written shard by shard by each rank (fsdp.save_optimizer)."""
    path = f"{args.out}/checkpoint-{step}"
    save_model(args, student, processor, path)
    fsdp.save_optimizer(student, opt, f"{path}/optimizer")  # every rank its own shard
    if fsdp.rank() == 0:
        torch.save({"scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "step": step, "wall": wall,
                    "args": dataclasses.asdict(args)}, f"{path}/state.pt")
        with open(f"{path}/step.json", "w") as f:  # what --resume checks before loading anything
            json.dump({"step": step}, f)
        link = f"{args.out}/checkpoint"
        previous = os.path.realpath(link) if os.path.lexists(link) else None
        if previous and not os.path.islink(link):  # a run folder from before the link: its folder moves aside
            previous = f"{link}-before"
            os.rename(link, previous)
        if os.path.lexists(f"{link}.new"):  # left by a run killed between these two lines
            os.remove(f"{link}.new")
        os.symlink(os.path.basename(path), f"{link}.new")
        os.replace(f"{link}.new", link)  # atomic: the link names the old checkpoint or the new, never half of one
        if previous and os.path.isdir(previous) and previous != os.path.realpath(path):
            shutil.rmtree(previous)
    fsdp.barrier()  # nobody reads the checkpoint before rank 0 has written it


def save_model(args, student, processor, path):
    """The student as a folder transformers loads: its gathered weights (fsdp.save_model), or with --lora-rank the
    merged model and, in path/adapter, the adapters alone (lora.save)."""
    if args.lora_rank:
        lora.save(student, processor, path)
    else:
        fsdp.save_model(student, processor, path)


def _interrupt(stop, signum, frame):
    """Run's signal handler: the first signal asks the loop to stop after this step, a second stops now."""
    if stop:
        raise KeyboardInterrupt
    stop.append(signum)
    tqdm.write("stopping after this step (Ctrl-C again to stop now)")


# ----------------------------------------------------------------------------- after training
def teacher_metrics(args, teacher, processor):
    """The teacher's greedy test metrics, cached in the run folder (the teacher never changes)."""
    path = f"{args.out}/teacher_eval.json"
    cached = os.path.exists(path)
    fsdp.barrier()  # every rank decides before rank 0 writes the file: all of them evaluate, or none
    if cached:
        with open(path) as f:
            return json.load(f)
    test = data.load_annotations(args.eval_data, args.video_root)
    metrics, _ = ev.evaluate(teacher, processor, test[:args.eval_limit] if args.eval_limit else test,
                             batch_size=args.eval_batch_size, fps=args.fps, max_frames=args.max_frames, desc="teacher",
                             num_workers=args.num_workers)
    if fsdp.rank() == 0:
        with open(path, "w") as f:
            json.dump(metrics, f)
    return metrics


def finish(args, student, processor, evals, teacher=None):
    """After training: OUT/final (save_pretrained), and the table student before / after (/ teacher) printed and
    written to OUT/summary.json."""
    save_model(args, student, processor, f"{args.out}/final")
    if not evals:
        return
    rows = {"student before": evals[0]["eval"], "student after": evals[-1]["eval"]}
    if teacher is not None:
        rows["teacher"] = teacher_metrics(args, teacher, processor)
    if fsdp.rank() == 0:
        print(ev.format_table(rows))
        with open(f"{args.out}/summary.json", "w") as f:
            json.dump(rows, f, indent=1)
