"""eval.py: IoU and metrics, the real model path (load_model, generate, predict) and the CLI with resume."""
import json
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch

import data
import eval as ev
from lib import report
import rollout
from conftest import REPO


# ============================================================================= metrics
@pytest.mark.parametrize("a, b, expected", [
    ((0, 10), (0, 10), 1.0),          # identical
    ((2, 4), (0, 10), 0.2),           # nested
    ((0, 10), (2, 4), 0.2),           # symmetric
    ((0, 2), (1, 3), 1 / 3),          # overlap 1 over union 3
    ((0, 5), (0, 10), 0.5),
    ((0, 1), (1, 2), 0.0),            # touching
    ((0, 1), (5, 6), 0.0),            # disjoint
    ((5, 6), (0, 1), 0.0),
    ((6, 2), (0, 10), 0.0),           # inverted prediction
    ((0, 10), (6, 2), 0.0),
    ((3, 3), (0, 10), 0.0),           # empty span
    (None, (0, 10), 0.0),
    ((0, 10), None, 0.0),
    ([1.5, 4.5], [3.0, 6.0], 1.5 / 4.5),  # lists, as read back from JSON
])
def test_iou(a, b, expected):
    assert ev.iou(a, b) == pytest.approx(expected)


def test_compute_metrics_by_hand():
    gt = [(0, 10)] * 6
    pred = [(0, 10),   # 1
            (5, 15),   # 5 / 15
            None,      # 0: unparseable answer
            (8, 2),    # 0: inverted
            (0, 5),    # 0.5 exactly: counts at R1@0.5
            [0, 7.5]]  # 0.75, as a JSON list
    m = ev.compute_metrics(pred, gt)
    assert set(m) == {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"}
    assert m["R1@0.3"] == pytest.approx(100 * 4 / 6)
    assert m["R1@0.5"] == pytest.approx(100 * 3 / 6)
    assert m["R1@0.7"] == pytest.approx(100 * 2 / 6)
    assert m["mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0.5 + 0.75) / 6)
    assert ev.compute_metrics([None], [(0, 1)]) == {"R1@0.3": 0.0, "R1@0.5": 0.0, "R1@0.7": 0.0, "mIoU": 0.0}
    with pytest.raises(ValueError):
        ev.compute_metrics([(0, 1)], [(0, 1), (0, 2)])


def test_format_table():
    t = ev.format_table({"model": {"R1@0.3": 50.0, "R1@0.5": 25.0, "R1@0.7": 12.5, "mIoU": 33.333}})
    header, row = t.splitlines()
    assert header.split() == ["R1@0.3", "R1@0.5", "R1@0.7", "mIoU"]
    assert row.split() == ["model", "50.0", "25.0", "12.5", "33.3"]


# ============================================================================= model path
def test_load_model_and_predict(teacher, tiny_test):
    model, processor = teacher
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    samples = tiny_test[0][:3]
    rows = ev.predict(model, processor, samples, batch_size=2, max_new_tokens=12)
    assert len(rows) == 3
    for row, s in zip(rows, samples):
        assert set(row) == {"id", "query", "gt", "answer", "pred", "iou"}
        assert (row["id"], row["query"], row["gt"]) == (s.id, s.query, list(s.span))
        assert isinstance(row["answer"], str) and "<|" not in row["answer"]
        assert row["pred"] == (list(data.parse_span(row["answer"])) if data.parse_span(row["answer"]) else None)
        assert row["iou"] == ev.iou(row["pred"], row["gt"])
    json.dumps(rows)  # rows go to preds.jsonl as they are


def test_predict_skip_bad(teacher, tiny_test, tmp_path, capsys):
    model, processor = teacher
    good = tiny_test[0][0]
    bad = data.Sample(str(tmp_path / "gone.mp4"), "q", (0.0, 1.0), None, "gone#0")
    with pytest.raises(data.DataError, match="gone.mp4"):
        ev.predict(model, processor, [good, bad], max_new_tokens=4)
    rows = ev.predict(model, processor, [bad, good], max_new_tokens=4, skip_bad=True)
    assert [r["id"] for r in rows] == [good.id]
    assert "skipped 1 samples" in capsys.readouterr().out


@contextmanager
def logit_bias(model, token_ids, value):
    """Add `value` to the logits of `token_ids` (a forward hook on lm_head), to steer sampling in tests."""
    bias = torch.zeros(model.lm_head.out_features)
    bias[list(token_ids)] = value
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias.to(out))
    try:
        yield
    finally:
        handle.remove()


def check_mask(ids, mask, eos, pad):
    """Mask is 1 up to and including the first EOS and 0 after; tokens after it are pad. Returns #rows that ended."""
    assert ids.shape == mask.shape
    ended = 0
    for row, m in zip(ids.tolist(), mask.tolist()):
        first = next((i for i, t in enumerate(row) if t in eos), None)
        if first is None:
            assert m == [1] * len(row)
        else:
            ended += first < len(row) - 1
            assert m == [1] * (first + 1) + [0] * (len(row) - first - 1)
            assert row[first + 1:] == [pad] * (len(row) - first - 1)
    return ended


def test_generate_mask_and_padding(teacher, tiny_test):
    model, processor = teacher
    tok = processor.tokenizer
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    assert model.generation_config.eos_token_id == eos and pad != eos
    batch = data.encode(processor, *tiny_test)
    torch.manual_seed(0)
    ended = 0
    with logit_bias(model, [eos], 4.0):  # make EOS come early in some rows, not in others
        for _ in range(3):
            ids, mask = rollout.generate(model, processor, batch, max_new_tokens=12, temperature=1.0)
            assert ids.shape[0] == 4
            ended += check_mask(ids, mask, {eos}, pad)
    assert ended > 0, "no row ended before max_new_tokens: the test did not exercise the mask"


def test_generate_mask_when_pad_is_an_eos(teacher, tiny_test):
    """Real Qwen3-VL lists <|endoftext|> (its pad) among its EOS ids: only the first EOS counts."""
    model, processor = teacher
    tok = processor.tokenizer
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    batch = data.encode(processor, *tiny_test)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [eos, pad]
    try:
        torch.manual_seed(1)
        ended = 0
        with logit_bias(model, [eos], 4.0):
            for _ in range(2):
                ids, mask = rollout.generate(model, processor, batch, max_new_tokens=12, temperature=1.0)
                ended += check_mask(ids, mask, {eos, pad}, pad)
        assert ended > 0
    finally:
        model.generation_config.eos_token_id = old


def test_generate_never_samples_vision_tokens(teacher, tiny_test):
    model, processor = teacher
    tok = processor.tokenizer
    vision = rollout.forbidden_ids(processor)
    assert set(vision) == {tok.convert_tokens_to_ids(t) for t in
                           ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]}
    batch = data.encode(processor, *tiny_test)
    torch.manual_seed(0)
    # with this bias an unsuppressed vision token would be sampled at nearly every step
    with logit_bias(model, vision, 30.0):
        for _ in range(3):
            ids, mask = rollout.generate(model, processor, batch, max_new_tokens=8, temperature=1.0)
            assert not torch.isin(ids, torch.tensor(vision)).any()
    ids, _ = rollout.generate(model, processor, batch, max_new_tokens=8)  # greedy too
    assert not torch.isin(ids, torch.tensor(vision)).any()


def test_greedy_is_deterministic_and_batch_independent(teacher, tiny_test):
    """Left padding: a sample's greedy answer does not depend on the batch it is in."""
    model, processor = teacher
    samples, videos = tiny_test
    ids, mask = rollout.generate(model, processor, data.encode(processor, samples, videos), max_new_tokens=6)
    again, _ = rollout.generate(model, processor, data.encode(processor, samples, videos), max_new_tokens=6)
    alone, _ = rollout.generate(model, processor, data.encode(processor, samples[1:2], videos[1:2]), max_new_tokens=6)
    assert torch.equal(ids, again) and torch.equal(ids[1], alone[0])


# ============================================================================= CLI
def run_cli(*args):
    out = subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_cli_writes_predictions_and_resumes(tiny, tmp_path):
    ann = tmp_path / "three.jsonl"
    ann.write_text("".join(open(tiny["test"]).readlines()[:3]))
    preds = tmp_path / "run" / "preds.jsonl"
    args = ["--model", tiny["teacher"], "--data", str(ann), "--out", str(tmp_path / "run"), "--max-new-tokens", "6",
            "--video-root", os.path.dirname(tiny["test"])]  # the miniature names its videos relative to its folder
    stdout = run_cli(*args)
    assert "R1@0.3" in stdout and "mIoU" in stdout and "teacher (3 queries)" in stdout
    lines = preds.read_text().splitlines()
    ids = [s.id for s in data.load_annotations(str(ann))]
    assert [json.loads(line)["id"] for line in lines] == ids
    assert all(set(json.loads(line)) == {"id", "query", "gt", "answer", "pred", "iou"} for line in lines)

    preds.write_text(lines[0] + "\n")  # as if interrupted after the first query
    stdout = run_cli(*args)
    assert "resuming: 1 of 3" in stdout and "teacher (3 queries)" in stdout
    again = preds.read_text().splitlines()
    assert again[0] == lines[0] and sorted(json.loads(line)["id"] for line in again) == sorted(ids)
    assert again == lines  # greedy: the resumed run answers the rest as the first run did


def _fake_run(folder, curve, step_time):
    folder.mkdir()
    with open(folder / "log.jsonl", "w") as f:
        for i, m in enumerate(curve):
            if i:
                f.write(json.dumps({"step": i * 10, "wall": i * 10 * step_time, "loss": 0.1, "tokens_per_s": 100.0,
                                    "time": {"generate": step_time / 2, "student": step_time / 4,
                                             "teacher": 0.0, "other": step_time / 4}}) + "\n")
            f.write(json.dumps({"step": i * 10, "wall": i * 10 * step_time,
                                "eval": {"R1@0.3": m, "R1@0.5": m, "R1@0.7": m, "mIoU": m}}) + "\n")


def test_compare_time_to_target_and_seed_groups(tmp_path):
    """The weaker run's best (60) is the target: the fast run reaches it at step 10, the slow one at step 30."""
    _fake_run(tmp_path / "fast-s0", [50, 60, 80, 90], step_time=1.0)
    _fake_run(tmp_path / "fast-s1", [50, 70, 80, 80], step_time=1.0)
    _fake_run(tmp_path / "slow", [50, 55, 58, 60], step_time=2.0)
    runs = [str(tmp_path / n) for n in ("fast-s0", "fast-s1", "slow")]
    out = report.compare(runs, str(tmp_path / "cmp"))
    assert out[runs[0]]["target_mIoU"] == 60 and out[runs[0]]["target_step"] == 10
    assert out[runs[2]]["target_step"] == 30 and out[runs[2]]["time_to_target_s"] == 60
    assert out[runs[0]]["best_mIoU"] == 90 and out[runs[1]]["final_mIoU"] == 80
    saved = json.load(open(tmp_path / "cmp.json"))
    assert saved["seeds"][str(tmp_path / "fast")]["best_mIoU"] == [85.0, 5.0]  # mean, std over the two seeds
    assert saved["step_time"][runs[2]]["other_%"] == 25.0
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    never = report.compare(runs, str(tmp_path / "cmp2"), target=85)
    assert never[runs[0]]["target_step"] == 30 and never[runs[2]]["target_step"] != never[runs[2]]["target_step"]


def test_compare_time_to_target_against_a_baseline(tmp_path):
    """The paper's way: target = the baseline's best mIoU, mean over its seeds (60 and 70: 65); ratio = a run's time
    to it over the baseline's mean time (only base-s1 reaches 65, at 20 s), over the seeds that reach it."""
    _fake_run(tmp_path / "base-s0", [50, 60, 60, 60], step_time=1.0)  # never 65
    _fake_run(tmp_path / "base-s1", [50, 60, 66, 70], step_time=1.0)  # 65 at step 20
    _fake_run(tmp_path / "fast-s0", [50, 65, 90], step_time=1.0)      # at step 10: ratio 0.5
    _fake_run(tmp_path / "fast-s1", [50, 60, 70], step_time=1.0)      # at step 20: ratio 1.0
    _fake_run(tmp_path / "costly", [50, 60, 70], step_time=3.0)       # at step 20, 3 s a step: ratio 3.0
    runs = [str(tmp_path / n) for n in ("base-s0", "base-s1", "fast-s0", "fast-s1", "costly")]
    out = report.compare(runs, str(tmp_path / "cmp"), baseline=str(tmp_path / "base"))
    assert all(r["target_mIoU"] == 65 for r in out.values())
    times = [out[r]["time_to_target_s"] for r in runs]
    assert times[0] != times[0] and times[1:] == [20, 10, 20, 60]
    saved = json.load(open(tmp_path / "cmp.json"))
    assert saved["target_mIoU"] == 65 and saved["baseline"] == str(tmp_path / "base")
    ratio = {os.path.basename(k): v for k, v in saved["ratio"].items()}
    assert ratio["fast"] == {"mean": 0.75, "std": 0.25, "reached": 2, "seeds": 2}
    assert ratio["base"]["reached"] == 1 and ratio["base"]["mean"] == 1.0 and ratio["costly"]["mean"] == 3.0
    with pytest.raises(data.DataError, match="none of the runs"):
        report.compare(runs, str(tmp_path / "cmp3"), baseline=str(tmp_path / "grpo"))


def test_compare_against_a_baseline_whose_best_is_its_start(tmp_path):
    """A baseline that never improves: every run is at the target at step 0, so no ratio (NaN), not a crash."""
    _fake_run(tmp_path / "flat-s0", [70, 60, 65], step_time=1.0)
    _fake_run(tmp_path / "flat-s1", [70, 70, 68], step_time=1.0)
    _fake_run(tmp_path / "fast-s0", [70, 90, 95], step_time=1.0)
    runs = [str(tmp_path / n) for n in ("flat-s0", "flat-s1", "fast-s0")]
    out = report.compare(runs, str(tmp_path / "cmp"), baseline=str(tmp_path / "flat"))
    assert all(r["target_mIoU"] == 70 and r["time_to_target_s"] == 0 for r in out.values())
    ratio = {os.path.basename(k): v for k, v in json.load(open(tmp_path / "cmp.json"))["ratio"].items()}
    assert ratio["fast"]["mean"] != ratio["fast"]["mean"] and ratio["fast"]["reached"] == 1


def test_compare_a_fixed_target_against_a_baseline(tmp_path):
    """--target with --baseline: the target is the fixed mIoU (fixed before the runs), the ratio is over the
    baseline's time to it; a baseline that never reaches it gives no ratio (NaN), and its seeds are counted."""
    _fake_run(tmp_path / "base-s0", [50, 60, 72, 80], step_time=1.0)  # 70 at step 20
    _fake_run(tmp_path / "base-s1", [50, 71, 75, 80], step_time=1.0)  # 70 at step 10
    _fake_run(tmp_path / "fast-s0", [50, 75, 90], step_time=1.0)      # at step 10: ratio 10 / 15
    runs = [str(tmp_path / n) for n in ("base-s0", "base-s1", "fast-s0")]
    out = report.compare(runs, str(tmp_path / "cmp"), target=70, baseline=str(tmp_path / "base"))
    assert all(r["target_mIoU"] == 70 for r in out.values())
    ratio = {os.path.basename(k): v for k, v in json.load(open(tmp_path / "cmp.json"))["ratio"].items()}
    assert ratio["fast"]["mean"] == pytest.approx(10 / 15) and ratio["base"]["reached"] == 2
    with warnings.catch_warnings():  # no seed at 85: NaN in the tables, not numpy's empty-slice warning
        warnings.simplefilter("error")
        report.compare(runs, str(tmp_path / "cmp2"), target=85, baseline=str(tmp_path / "base"))
    cmp2 = json.load(open(tmp_path / "cmp2.json"))
    ratio = {os.path.basename(k): v for k, v in cmp2["ratio"].items()}
    seeds = {os.path.basename(k): v for k, v in cmp2["seeds"].items()}
    assert seeds["base"]["time_to_target_s"][0] != seeds["base"]["time_to_target_s"][0]
    assert ratio["fast"]["reached"] == 1 and ratio["fast"]["mean"] != ratio["fast"]["mean"]
    assert ratio["base"]["reached"] == 0
