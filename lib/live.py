"""A live view of a run, off by default (ours, as cleanrl and nanoGPT offer): --report-to tensorboard | wandb.

    view = live.View(args, start)     # rank 0 opens the logger; every other rank, and --report-to none, do nothing
    view.step(record)                 # a step's line of log.jsonl as scalars: train/loss, train/kl, time/generate, ...
    view.evaluation(record, rows)     # eval/mIoU, eval/R1@0.5, ... and a few answers beside the ground truth
    view.close()                      # lib/run.py's Run closes it on every exit path (Ctrl-C, an error) too

log.jsonl stays the record of a run; the view shows the same numbers while it runs. TensorBoard writes its events to
OUT/tensorboard (`tensorboard --logdir OUT`); W&B runs offline into OUT/wandb unless WANDB_API_KEY or WANDB_MODE says
otherwise (`wandb sync OUT/wandb/offline-run-*` uploads it later). Each logger is imported only when asked for.
"""
import dataclasses
import os

from lib import fsdp

ANSWERS = 4  # the evaluation's first answers shown beside their ground truth


def scalars(record):
    """A log.jsonl record -> {tag: number}: a step's "train/..." and "time/..." values, an evaluation's "eval/..."."""
    if "eval" in record:
        return {f"eval/{k}": v for k, v in record["eval"].items()}
    out = {f"time/{k}": v for k, v in record.get("time", {}).items()}
    out |= {f"train/{k}": v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
    return out


def answers_table(rows, n=ANSWERS):
    """The first `n` prediction rows (eval.predict's) -> a Markdown table: query, ground truth, answer, IoU."""
    lines = ["| query | ground truth | answer | IoU |", "|---|---|---|---|"]
    for r in rows[:n]:
        gt = "%.1f - %.1f" % tuple(r["gt"])
        answer = r["answer"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['query']} | {gt} | {answer} | {r['iou']:.2f} |")
    return "\n".join(lines)


class View:
    """The run's live view (the module's docstring shows the use). start: the step this run starts after (on --resume,
    TensorBoard drops what a killed run logged after its checkpoint, as log.jsonl does)."""

    def __init__(self, args, start=0):
        self.kind = args.report_to if fsdp.rank() == 0 else "none"
        self.writer = None
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(f"{args.out}/tensorboard", purge_step=start + 1 if start else None)
        elif self.kind == "wandb":
            import wandb
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.writer = wandb.init(project=os.environ.get("WANDB_PROJECT", "video-opd"),
                                     name=os.path.basename(args.out.rstrip("/")), dir=args.out, mode=mode,
                                     config=dataclasses.asdict(args))

    def step(self, record):
        """One step's record of log.jsonl."""
        self._log(scalars(record), record["step"])

    def evaluation(self, record, rows):
        """One evaluation's record of log.jsonl, and its first answers (eval.predict's rows)."""
        self._log(scalars(record), record["step"])
        if self.kind == "tensorboard":
            self.writer.add_text("eval/answers", answers_table(rows), record["step"])
        elif self.kind == "wandb":
            import wandb
            table = wandb.Table(columns=["query", "ground truth", "answer", "IoU"],
                                data=[[r["query"], str(r["gt"]), r["answer"], r["iou"]] for r in rows[:ANSWERS]])
            self.writer.log({"eval/answers": table}, step=record["step"])

    def _log(self, values, step):
        if self.kind == "tensorboard":
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        elif self.kind == "wandb":
            self.writer.log(values, step=step)

    def close(self):
        """Everything written out and the logger closed (W&B: the run finished); safe to call twice."""
        if self.writer is not None:
            if self.kind == "tensorboard":
                self.writer.close()
            else:
                self.writer.finish()
            self.writer = None
