"""Nothing lost, nothing silent: bad input is one line on stderr (exit code 2) before a model loads, a finished
run is never overwritten, eval never mixes another model's answers, Ctrl-C / SIGTERM save and stop cleanly."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(script, *args, timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _refused(res, *words):
    """Exit code 2 and one line on stderr that names the problem (no traceback)."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def _checksums(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _common(tiny, out):
    return ["--student", tiny["student"], "--teacher", tiny["teacher"], "--data", tiny["train"], "--eval-data",
            tiny["test"], "--out", str(out), "--prompts-per-step", "2", "--micro-batch", "2", "--max-new-tokens", "8",
            "--eval-limit", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished 1-step opd.py run and the checksums of every file in it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    res = _cli("opd.py", *_common(tiny, out), "--steps", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "final").is_dir() and (out / "summary.json").exists()
    return out, _checksums(out)


@pytest.mark.parametrize("extra, words", [
    (["--steps", "-1"], ["--steps must be >= 1", "-1"]),  # before: exit 0, final/ replaced by the untrained student
    ([], ["already holds a run", "--resume", "--overwrite"]),  # before: silently restarted at step 0
    (["--loss", "foo"], ["--loss", "foo"]),  # before: accepted, 200 steps of the sampled loss
    (["--rollouts", "techer"], ["--rollouts", "techer"]),  # before: fell back to on-policy
    (["--steps", "1", "--resume"], ["trained 1 of --steps 1"]),  # nothing to train: refused, not rewritten
])
def test_a_finished_run_is_never_touched(tiny, finished, extra, words):
    out, before = finished
    _refused(_cli("opd.py", *_common(tiny, out), *extra), *words)
    assert _checksums(out) == before


def test_missing_videos_are_counted_before_any_model_loads(tiny, finished, tmp_path):
    """Before: a 41-line traceback from a DataLoader worker after a step-0 evaluation, the finished run's log cut."""
    out, before = finished
    rows = open(tiny["train"]).readlines()[:6]
    rows[2] = rows[2].replace(".mp4", "_gone.mp4")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(rows))
    args = _common(tiny, out) + ["--video-root", os.path.dirname(tiny["train"])]  # its videos are named relatively
    args[args.index("--data") + 1] = str(bad)
    _refused(_cli("opd.py", *args, "--overwrite"), "1 of 6 videos not found", "_gone.mp4", "--skip-bad")
    assert _checksums(out) == before  # even with --overwrite: inputs are validated first
    args[args.index("--out") + 1] = str(tmp_path / "skip")
    res = _cli("opd.py", *args, "--steps", "1", "--skip-bad")
    assert res.returncode == 0 and "skipping 1 of 6 samples" in res.stdout


@pytest.mark.parametrize("content, words", [
    ('{"video": "a.mp4", "query": "x", "span": [1, 2]}\n{"video": "a.mp4", "query": \n', ["line 2", "malformed"]),
    ("", ["unknown annotation format"]),
    ('{"video": "a.mp4", "query": "x", "span": [5, 2]}\n', ["no usable spans"]),
])
def test_bad_annotations_are_one_line(tiny, tmp_path, content, words):
    ann = tmp_path / "ann.jsonl"
    ann.write_text(content)
    start = time.time()
    args = _common(tiny, tmp_path / "run")
    args[args.index("--data") + 1] = str(ann)
    _refused(_cli("opd.py", *args), str(ann), *words)
    assert not (tmp_path / "run").exists()
    assert time.time() - start < 60  # refused before a model loads (minutes for real checkpoints)


@pytest.mark.parametrize("script", ["opd.py", "grpo.py", "eval.py", "tvdf.py"])
def test_a_missing_model_folder_says_so(tiny, tmp_path, script):
    """Before: 32 lines ending in a hub error, 'Repo id must use alphanumeric chars'."""
    flag = "--model" if script == "eval.py" else "--student"
    res = _cli(script, flag, str(tmp_path / "nonexistent"), "--data", tiny["test"])
    _refused(res, "nonexistent", "no such model folder")


def test_resume_without_a_checkpoint_is_one_line(tiny, tmp_path):
    _refused(_cli("opd.py", *_common(tiny, tmp_path / "new"), "--resume"), "no checkpoint")


def test_eval_never_mixes_another_models_answers(tiny, tmp_path):
    """Before: `eval.py` then `eval.py --model student` printed the teacher's resumed answers as the student's."""
    out = tmp_path / "eval"
    common = ["--data", tiny["test"], "--out", str(out), "--max-new-tokens", "6"]
    res = _cli("eval.py", "--model", tiny["teacher"], *common)
    assert res.returncode == 0, res.stderr[-2000:]
    before = _checksums(out)
    assert set(before) == {"preds.jsonl", "setup.json", "metrics.json"}
    _refused(_cli("eval.py", "--model", tiny["student"], *common), "other settings", "student")
    _refused(_cli("eval.py", "--model", tiny["teacher"], *common[:-1], "12"), "max_new_tokens 6 -> 12")
    assert _checksums(out) == before
    res = _cli("eval.py", "--model", tiny["student"], *common, "--overwrite")
    assert res.returncode == 0 and "resuming" not in res.stdout
    assert json.load(open(out / "setup.json"))["model"] == os.path.abspath(tiny["student"])


def test_help_shows_the_defaults_used_and_only_the_scripts_flags():
    opd_help, grpo_help = _cli("opd.py", "--help").stdout, _cli("grpo.py", "--help").stdout
    import opd
    assert f"{opd.MINIATURE['lr']} on the miniature, 1e-06 with --student/--data" in " ".join(opd_help.split())
    assert "fullkl on the miniature" in " ".join(opd_help.split())
    for flag in ("--teacher", "--loss", "--rollouts-per-prompt", "--kl-chunk"):
        assert flag in opd_help and flag not in grpo_help
    assert "--group-size" in grpo_help
    for flag in ("--va-top", "--rounds", "--visd-clip", "--group-size"):  # the other methods' flags are theirs
        assert flag not in opd_help


@pytest.mark.parametrize("group", [False, True])
def test_sigterm_saves_the_step_and_stops_the_workers(tiny, tmp_path, group):
    """Before: a bare traceback, nothing saved (checkpoints every 100 steps) and an orphaned DataLoader worker.
    group: SIGTERM to the whole process group, as torchrun and Slurm send it (before: the worker died first and the
    main process raised "DataLoader worker ... is killed by signal: Terminated", no checkpoint)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "opd.py", *_common(tiny, out), "--steps", "50", "--eval-every", "0",
                             "--num-workers", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    log = out / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and '"loss"' in log.read_text()):
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the DataLoader worker should be running"
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted: checkpoint at step" in stderr.strip().splitlines()[-1]
    import torch
    step = torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"]
    logged = [r["step"] for r in map(json.loads, open(log)) if "loss" in r]
    assert 1 <= step < 50 and logged[-1] == step  # the checkpoint is the last logged step
    time.sleep(1)
    assert not [c for c in children if os.path.exists(f"/proc/{c}")]  # the worker is gone with its parent
    res = _cli("opd.py", *_common(tiny, out), "--steps", str(step + 1), "--eval-every", "0", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["step"] for r in map(json.loads, open(log)) if "loss" in r] == list(range(1, step + 2))


def test_the_miniatures_own_models_and_data_keep_its_settings(tmp_path, monkeypatch):
    """Its weaker teacher or noisy pool named on the command line still run with the miniature's settings; any
    other model or data gets the paper's (lr 1e-6)."""
    from lib import cli
    import opd
    monkeypatch.chdir(tmp_path)
    assert cli.of_miniature("runs/toy/teacher_weak") and cli.of_miniature("runs/toy/train_noisy.jsonl")
    assert not cli.of_miniature("runs/toy-other/student") and not cli.of_miniature("Qwen/Qwen3-VL-8B-Instruct")
    noisy_pool = ["--teacher", "runs/toy/teacher_weak", "--data", "runs/toy/train_noisy.jsonl"]
    for argv, lr in ((noisy_pool, opd.MINIATURE["lr"]),
                     (["--teacher", "Qwen/Qwen3-VL-32B-Instruct"], 1e-6)):
        monkeypatch.setattr(sys, "argv", ["opd.py", *argv])
        assert cli.parse(opd.Args, opd.MINIATURE).lr == lr
