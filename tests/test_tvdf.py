"""tvdf.py: select() on crafted inputs for every strategy, the stage runner, selection and the curriculum on the
reduced miniature."""
import dataclasses
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import data
import tvdf
from test_opd import ROOT, _run

T = np.array([0.9, 0.2, 0.8, 0.95, 0.7, 0.6, 0.3, 1.0])
S = np.array([0.1, 0.0, 0.7, 0.2, 0.6, 0.1, 0.0, 0.95])   # deltas: .8 .2 .1 .75 .1 .5 .3 .05


@pytest.mark.parametrize("strategy", tvdf.STRATEGIES)
def test_nothing_below_tau_and_no_repeats(strategy):
    for seed in range(20):
        for k in (1, 3, 5, 100):
            pick = tvdf.select(T, S, k, 0.5, strategy, seed)
            assert (T[pick] >= 0.5).all()
            assert len(set(pick.tolist())) == len(pick) == min(k, (T >= 0.5).sum())


def test_topk_takes_the_largest_deltas_among_those_passing_tau():
    assert tvdf.select(T, S, 3, 0.5).tolist() == [0, 3, 5]
    assert tvdf.select(T, S, 2, 0.0).tolist() == [0, 3]          # tau 0: DBTP alone
    assert tvdf.select(T, S, 3, 0.85).tolist() == [0, 3, 7]      # only 3 pass
    assert tvdf.select(T, S, 3, 1.01).tolist() == []             # none pass


def test_dsus_spreads_over_the_sorted_deltas():
    # passing (tau .5), sorted by delta: 0 (.8), 3 (.75), 5 (.5), 2 (.1), 4 (.1), 7 (.05)
    assert tvdf.select(T, S, 3, 0.5, "dsus").tolist() == [0, 5, 7]


def test_bbds_draws_evenly_from_five_buckets():
    delta = np.linspace(0, 1, 100)            # 20 samples per bucket
    t = np.ones(100)
    pick = tvdf.select(t, t - delta, 10, 0.5, "bbds", seed=3)
    counts = np.bincount(np.minimum((delta[pick] * 5).astype(int), 4), minlength=5)
    assert counts.tolist() == [2, 2, 2, 2, 2]
    # a bucket with too few samples hands its share to the others
    delta = np.r_[np.zeros(30), [0.5], np.ones(30)]
    pick = tvdf.select(np.ones(61), 1 - delta, 7, 0.5, "bbds")
    assert len(pick) == 7 and 30 in pick.tolist()


def test_gwds_frequencies_follow_its_formula():
    delta = np.array([0.9, 0.7, 0.5, 0.2, -0.2])
    p = np.exp(-(delta - 0.9) ** 2 / (2 * 0.2 ** 2))
    p /= p.sum()
    n = 4000
    counts = np.bincount([tvdf.select(np.ones(5), 1 - delta, 1, 0.5, "gwds", seed)[0] for seed in range(n)],
                         minlength=5)
    assert np.allclose(counts / n, p, atol=0.025), (counts / n, p)


def test_random_ignores_delta():
    picks = np.concatenate([tvdf.select(T, S, 1, 0.5, "random", seed) for seed in range(600)])
    counts = np.bincount(picks, minlength=8)[T >= 0.5]
    assert counts.min() > 60  # every passing sample is drawn about 1/6 of the time


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        tvdf.select(T, S, 1, 0.5, "nope")


def test_select_only_writes_a_loadable_subset(tiny, tmp_path):
    res = subprocess.run([sys.executable, "tvdf.py", "--select-only", "--student", tiny["student"], "--teacher",
                          tiny["teacher"], "--data", tiny["train"], "--eval-data", tiny["test"], "--k", "5", "--tau",
                          "0", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "delta mean" in res.stdout and "wrote 5 samples" in res.stdout
    chosen = data.load_annotations(str(tmp_path / "selected.jsonl"))
    pool = {s.query + s.video: s for s in data.load_annotations(tiny["train"])}
    assert len(chosen) == 5 and all(s.query + s.video in pool for s in chosen)
    assert (tmp_path / "teacher_iou.json").exists()  # the teacher's scores are cached
    assert not (tmp_path / "log.jsonl").exists()  # nothing was trained


def test_curriculum_two_rounds(tiny, tmp_path):
    out = _run("tvdf.py", tiny, tmp_path, "--steps", "4", "--rounds", "2", "--k", "3", "--tau", "0",
               "--warmup-steps", "2", "--lr", "3e-4", "--schedule", "constant")  # flat after the warm-up: legible
    assert out.count("TVDF round") == 2
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and {r["stage"] for r in log} == {"round1", "round2"}
    # one AdamW and one warm-up across the rounds: round 2 does not restart at lr 1e-4 (it did before)
    assert [r["lr"] for r in steps] == pytest.approx([2e-4, 3e-4, 3e-4, 3e-4])
    assert json.load(open(tmp_path / "teacher_iou.json"))  # cached for the next rounds
    assert "teacher" in json.load(open(tmp_path / "summary.json"))


def test_train_in_stages_splits_steps_and_joins_logs(tmp_path):
    """7 steps over 3 stages -> 2, 2, 3; one log with steps and wall time running on, one "before" evaluation."""
    seen = []

    def run(i, stage_args):  # a stand-in for opd.train: logs "before", each step, "after"
        seen.append((i, stage_args.steps, stage_args.out))
        recs = [{"step": 0, "wall": 0.0, "eval": {"mIoU": i}}]
        recs += [{"step": s, "wall": 1.5 * s, "loss": 0.1} for s in range(1, stage_args.steps + 1)]
        recs += [{"step": stage_args.steps, "wall": 1.5 * stage_args.steps, "eval": {"mIoU": i + 1}}]
        os.makedirs(stage_args.out)
        with open(f"{stage_args.out}/log.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        return [r for r in recs if "eval" in r]

    args = tvdf.TVDFArgs(out=str(tmp_path), steps=7)
    evals = tvdf.train_in_stages(args, ["a", "b", "c"], run)
    assert [(i, n) for i, n, _ in seen] == [(0, 2), (1, 2), (2, 3)] and seen[2][2] == f"{tmp_path}/c"
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 8))
    assert [r["wall"] for r in log if "loss" in r] == [1.5, 3.0, 4.5, 6.0, 7.5, 9.0, 10.5]
    assert [(r["step"], r["stage"]) for r in log if "eval" in r] == [(0, "a"), (2, "a"), (4, "b"), (7, "c")]
    assert [(e["step"], e["eval"]["mIoU"]) for e in evals] == [(0, 0), (2, 1), (4, 2), (7, 3)]


def test_teacher_iou_cache_is_keyed_by_teacher_data_and_fps(tmp_path, monkeypatch):
    """A cached IoU is reused only for the same teacher, fps and sample (video, query, span), not by id alone."""
    calls = []

    def fake_sample_ious(model, processor, samples, n=1, temperature=1.0, batch_size=16, desc="", fps=2.0,
                         max_frames=256):
        calls.append(len(samples))
        return np.full(len(samples), fps / 10)
    monkeypatch.setattr(tvdf, "sample_ious", fake_sample_ious)
    cache = str(tmp_path / "teacher_iou.json")
    pool = [data.Sample(f"/v/{i}.mp4", "the red circle", (1.0, 3.0), 8.0, f"v{i}#0") for i in range(3)]
    teacher_a, teacher_b = SimpleNamespace(name_or_path="teacher-a"), SimpleNamespace(name_or_path="teacher-b")
    assert tvdf.teacher_ious(teacher_a, None, pool, cache).tolist() == pytest.approx([0.2] * 3)
    assert tvdf.teacher_ious(teacher_a, None, pool, cache).tolist() == pytest.approx([0.2] * 3) and calls == [3]
    assert tvdf.teacher_ious(teacher_a, None, pool, cache, fps=1.0).tolist() == pytest.approx([0.1] * 3)
    tvdf.teacher_ious(teacher_b, None, pool, cache)
    other_data = [dataclasses.replace(pool[0], span=(2.0, 5.0))] + pool[1:]  # same id, another annotation
    tvdf.teacher_ious(teacher_a, None, other_data, cache)
    assert calls == [3, 3, 3, 1]
