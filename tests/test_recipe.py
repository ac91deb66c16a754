"""The official recipe's flags: --epochs (shuffled passes over the data), the cosine schedule after the warm-up, and
the real-model defaults that follow the official code (the miniature keeps its own)."""
import math
import sys
from types import SimpleNamespace

import pytest
import torch

import opd
from lib import cli, run


def _args(**kw):
    return SimpleNamespace(**(dict(seed=0, prompts_per_step=3, micro_batch=2, epochs=0) | kw))


def test_epochs_visit_every_sample_once_per_epoch_in_a_new_order():
    samples = list(range(10))  # 3 steps of 3 an epoch; the tenth sample waits for the next epoch's order
    args = _args(epochs=2)
    steps = [[s for _, mb in run.plan(args, samples, step) for s in mb] for step in range(6)]
    first, second = sum(steps[:3], []), sum(steps[3:], [])
    assert len(set(first)) == len(first) == 9 and len(set(second)) == len(second) == 9
    assert first != second
    assert [len(mb) for _, mb in run.plan(args, samples, 0)] == [2, 1]  # micro-batches of --micro-batch


def test_epochs_split_the_same_steps_over_ranks(monkeypatch):
    samples, args = list(range(12)), _args(epochs=1, prompts_per_step=4, micro_batch=1)
    whole = [s for _, mb in run.plan(args, samples, 1) for s in mb]
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(run.fsdp, "rank", lambda: rank)
        monkeypatch.setattr(run.fsdp, "world", lambda: 2)
        shares += [s for _, mb in run.plan(args, samples, 1) for s in mb]
    assert shares == whole


def test_random_prompts_without_epochs_are_unchanged():
    import random
    idx = random.Random(0 * 100_003 + 5).sample(range(10), 3)
    assert [s for _, mb in run.plan(_args(), list(range(10)), 5) for s in mb] == idx


def _lrs(**kw):
    args = SimpleNamespace(**(dict(lr=1.0, weight_decay=0.0, warmup_steps=0, warmup_ratio=0.0, steps=100,
                                   schedule="cosine") | kw))
    opt, sched = opd.make_optimizer(args, torch.nn.Linear(2, 2))
    lrs = []
    for _ in range(args.steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_cosine_after_the_warm_up():
    lrs = _lrs(warmup_ratio=0.03)  # 3 warm-up steps of 100, as the official code's 3%
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[53] == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 97)))
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert _lrs(warmup_steps=5, warmup_ratio=0.5)[5] == pytest.approx(1.0)  # steps, when given, over the ratio


def test_constant_schedule_is_the_miniatures_warm_up_then_flat():
    assert _lrs(warmup_steps=5, schedule="constant", steps=10) == pytest.approx(
        [min(1.0, (s + 1) / 6) for s in range(10)])


def test_real_models_get_the_official_defaults_the_miniature_its_own(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["opd.py", "--student", "Qwen/Qwen3-VL-8B-Instruct"])
    real = cli.parse(opd.Args, opd.MINIATURE)
    assert (real.temperature, real.weight_decay, real.warmup_ratio, real.max_frames, real.schedule, real.lr) == (
        0.9, 0.1, 0.03, 768, "cosine", 1e-6)
    monkeypatch.setattr(sys, "argv", ["opd.py"])
    mini = cli.parse(opd.Args, opd.MINIATURE)
    assert (mini.temperature, mini.weight_decay, mini.warmup_steps, mini.max_frames, mini.schedule) == (
        1.0, 0.0, 5, 256, "constant")


def test_epochs_set_the_steps_from_the_data(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["opd.py", "--student", tiny["student"], "--teacher", tiny["teacher"], "--data",
                                      tiny["train"], "--epochs", "2", "--prompts-per-step", "4",
                                      "--out", str(tmp_path / "run")])
    args = cli.start_run(cli.parse(opd.Args, opd.MINIATURE))
    n = sum(1 for line in open(tiny["train"]) if line.strip())
    assert args.steps == 2 * (n // 4)
