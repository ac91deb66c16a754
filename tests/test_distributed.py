"""torchrun + FSDP2 on CPU (gloo): 2 processes x half the prompts == 1 process with the whole step's prompts."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

from test_opd import ROOT, _run, _weights


def _torchrun(script, tiny, out, *extra):
    """_run's command under `torchrun --nproc_per_node 2` (one CPU thread per process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           "--student", tiny["student"], *(("--teacher", tiny["teacher"]) if script == "opd.py" else ()),
           "--data", tiny["train"],
           "--eval-data", tiny["test"], "--out", str(out), "--prompts-per-step", "4", "--micro-batch", "2",
           "--lr", "1e-3", "--max-new-tokens", "8", "--eval-limit", "4", *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]


def _assert_same_run(a, b, tiny):
    """Same logged losses and the same final weights (up to the order of float additions), and training moved them."""
    assert _losses(a) == _losses(b) or torch.allclose(torch.tensor(_losses(a)), torch.tensor(_losses(b)), rtol=1e-5)
    wa, wb = _weights(a / "final"), _weights(b / "final")
    assert wa.keys() <= wb.keys()  # (a gathered state dict may also list the tied lm_head)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    start = _weights(tiny["student"])
    assert any(not torch.equal(wa[k], start[k]) for k in start)
    # the periodic evaluation, split over the ranks (each answers its share) and gathered: the same metrics
    # (a resumed run also holds the evaluation its first part ended with)
    evals = [{r["step"]: r["eval"] for r in map(json.loads, open(run / "log.jsonl")) if "eval" in r} for run in (a, b)]
    both = evals[0].keys() & evals[1].keys()
    assert len(both) >= 2 and {k: evals[0][k] for k in both} == {k: evals[1][k] for k in both}


def test_opd_two_processes_match_one(tiny, tmp_path):
    """Each rank takes 2 of the 4 prompts (one micro-batch); FSDP averages the gradients. Rank 0 alone writes the
    live view."""
    _run("opd.py", tiny, tmp_path / "one", "--steps", "2", "--loss", "fullkl")
    _torchrun("opd.py", tiny, tmp_path / "two", "--steps", "2", "--loss", "fullkl", "--report-to", "tensorboard")
    _assert_same_run(tmp_path / "one", tmp_path / "two", tiny)
    assert len(os.listdir(tmp_path / "two" / "tensorboard")) == 1
    # each rank wrote its own shard of the optimizer state; nothing gathered into state.pt
    shards = sorted(os.listdir(tmp_path / "two" / "checkpoint" / "optimizer"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    assert "optimizer" not in torch.load(tmp_path / "two" / "checkpoint" / "state.pt", weights_only=False)
    # rank 0 wrote a checkpoint plain transformers loads
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "two" / "checkpoint")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"


def test_resume_a_one_process_checkpoint_under_torchrun(tiny, tmp_path):
    """Checkpoints hold whole weights and name-keyed optimizer state: any number of ranks resumes them."""
    _run("opd.py", tiny, tmp_path / "one", "--steps", "2", "--loss", "sampled")
    _run("opd.py", tiny, tmp_path / "split", "--steps", "1", "--loss", "sampled")
    _torchrun("opd.py", tiny, tmp_path / "split", "--steps", "2", "--loss", "sampled", "--resume")
    _assert_same_run(tmp_path / "one", tmp_path / "split", tiny)


def test_grpo_two_processes_match_one(tiny, tmp_path):
    flags = ("--steps", "2", "--prompts-per-step", "2", "--micro-batch", "1", "--group-size", "4",
             "--max-new-tokens", "16", "--temperature", "0.3")  # as test_grpo's smoke run: some rewards
    _run("grpo.py", tiny, tmp_path / "one", *flags)
    _torchrun("grpo.py", tiny, tmp_path / "two", *flags)
    _assert_same_run(tmp_path / "one", tmp_path / "two", tiny)


def test_bf16_under_fsdp_tracks_one_process(tiny, tmp_path):
    """--bf16 under torchrun: FSDP's mixed precision (bf16 units, fp32 reduce) in place of autocast, whose cast
    weights would add a bf16 copy of the whole model on every rank. The same README flags as one process with
    autocast: the step runs and tracks it (bf16 sampling differs after a few tokens; the exact KL over 4 prompts)."""
    flags = ("--steps", "1", "--loss", "fullkl", "--bf16", "--max-new-tokens", "16", "--temperature", "0.5")
    _run("opd.py", tiny, tmp_path / "one", *flags)
    _torchrun("opd.py", tiny, tmp_path / "two", *flags)
    (a,), (b,) = [[r for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r] for run in
                  (tmp_path / "one", tmp_path / "two")]
    assert b["loss"] == pytest.approx(a["loss"], rel=0.3) and b["grad_norm"] > 0
