"""lib/live.py: --report-to tensorboard / wandb, read back with each tool's own reader and compared with log.jsonl."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest

import opd
import rollout
from lib import live
from test_opd import ROOT, _run


def _log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def _tensorboard(out):
    """OUT/tensorboard read by TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events, tag):
    return {e.step: e.value for e in events.Scalars(tag)}


def test_tensorboard_holds_the_log(tiny, tmp_path):
    """Every step's and every evaluation's numbers of log.jsonl are in TensorBoard's events at their step, with the
    evaluation's first answers beside their ground truth; a resumed run keeps one value per step."""
    out = tmp_path / "run"
    _run("opd.py", tiny, out, "--steps", "2", "--eval-every", "1", "--report-to", "tensorboard", "--save-every", "1")
    _run("opd.py", tiny, out, "--steps", "3", "--eval-every", "1", "--report-to", "tensorboard", "--resume")
    events, log = _tensorboard(out), _log(out)
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [0, 1, 2, 3]
    for tag, key in (("train/loss", "loss"), ("train/kl", "kl"), ("train/rollout_iou", "rollout_iou"),
                     ("train/grad_norm", "grad_norm"), ("train/lr", "lr")):
        assert _scalars(events, tag) == pytest.approx({r["step"]: r[key] for r in steps}, rel=1e-6), tag
    assert _scalars(events, "time/generate") == pytest.approx({r["step"]: r["time"]["generate"] for r in steps})
    for metric in evals[0]["eval"]:
        assert _scalars(events, f"eval/{metric}") == pytest.approx({r["step"]: r["eval"][metric] for r in evals})
    answers = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("eval/answers/text_summary")}
    assert sorted(answers) == [0, 1, 2, 3]
    first = json.loads(open(tiny["test"]).readline())
    assert first["query"] in answers[3] and "| query | ground truth | answer | IoU |" in answers[3]


def test_the_view_is_closed_when_a_step_raises(tiny, tmp_path, monkeypatch):
    """Ctrl-C (a second one stops at once: KeyboardInterrupt) inside a step: the view is closed, its events on disk."""
    closed = []
    close = live.View.close
    monkeypatch.setattr(live.View, "close", lambda self: closed.append(self.kind) or close(self))
    student, processor = rollout.load_model(tiny["student"])
    args = opd.Args(student=tiny["student"], data=tiny["train"], out=str(tmp_path / "run"), steps=3,
                    prompts_per_step=2, micro_batch=2, max_new_tokens=4, num_workers=0, report_to="tensorboard")
    calls = []

    def loss_then_interrupt(logits, *_):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return logits.float().logsumexp(-1).mean()
    with pytest.raises(KeyboardInterrupt):
        opd.train(args, student, processor, lambda *_: {}, loss_then_interrupt)
    assert closed == ["tensorboard"]
    assert list(_scalars(_tensorboard(tmp_path / "run"), "train/loss")) == [1]


def _wandb_records(path):
    """The records of a W&B run file (LevelDB's log format: 32 KiB blocks of chunks with a 7-byte header, after a
    7-byte file header), each parsed as W&B's own protobuf Record."""
    from wandb.proto import wandb_internal_pb2
    raw, pos, chunks, records = open(path, "rb").read(), 7, b"", []
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0:  # a block's zero-filled tail
            pos += left
            continue
        chunks += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def test_wandb_runs_offline_and_holds_the_log(tiny, tmp_path, monkeypatch):
    """Without a key W&B runs offline into OUT/wandb; its history holds log.jsonl's numbers, its tables the answers."""
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    _run("opd.py", tiny, out, "--steps", "2", "--eval-every", "1", "--report-to", "wandb")
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
    log = _log(out)
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == \
        {r["step"]: r["loss"] for r in log if "loss" in r}
    assert {s: h["eval/mIoU"] for s, h in history.items()} == {r["step"]: r["eval"]["mIoU"] for r in log if "eval" in r}
    tables = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "table" / "eval" / "*.json")))
    assert len(tables) == 3
    first = json.loads(open(tiny["test"]).readline())
    assert json.load(open(tables[0]))["data"][0][:2] == [first["query"], str(first["span"])]


def test_no_logger_is_imported_by_default(tiny, tmp_path):
    """--report-to none (the default): neither logger is imported, nothing but log.jsonl is written."""
    code = ("import sys, runpy; sys.argv = sys.argv[1:]; runpy.run_path('opd.py', run_name='__main__')\n")
    probe = "import atexit, sys; atexit.register(lambda: print('loaded:', [m for m in ('wandb', " \
            "'torch.utils.tensorboard') if m in sys.modules]))\n"
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", probe + code, "opd.py", "--student", tiny["student"], "--teacher", tiny["teacher"],
           "--data", tiny["train"], "--eval-data", tiny["test"], "--out", str(out), "--steps", "1",
           "--prompts-per-step", "2", "--micro-batch", "2", "--max-new-tokens", "4", "--eval-limit", "2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "loaded: []" in res.stdout
    assert not os.path.exists(out / "tensorboard") and not os.path.exists(out / "wandb")
