"""The TimeLens formats (TimeLens-Bench, TimeLens-100K), the official release's ms-swift rows, and TimeLens's scorer.

The files below are written from the formats' own code: TencentARC/TimeLens @ 5d90c06,
timelens/dataset/timelens_data.py (TimeLens-Bench: {vid: {"duration", "spans", "queries"}}, spans[i] with queries[i],
videos VIDEO_ROOT/vid.mp4; TimeLens-100K: one video a line, {"source", "video_path", "duration", "events": [{"query",
"span"}]}, the first span of a nested list); ms-swift's `messages` + `videos` rows, the user turn holding `<video>`
and the TimeLens instruction, the answer in the assistant turn (the Video-OPD release's format, its README). The
scorer's expected numbers are worked by hand from evaluation/eval_dataloader.py and evaluation/compute_metrics.py.
"""
import json

import pytest

import data
import eval as ev

BENCH = {"v_one": {"duration": 30.0, "spans": [[2.0, 7.6], [10.0, 20.0]],
                   "queries": ["A man  runs across the field.", ". a dog barks ."]},
         "v_two": {"duration": 12.5, "spans": [[0, 4]], "queries": ["someone opens a door"]}}
HUNDRED_K = [{"source": "cosmo_cap", "video_path": "cosmo_cap/abc.mp4", "duration": 40.0,
              "events": [{"query": "the cat jumps.", "span": [[3.0, 9.5]]},
                         {"query": "the cat sleeps", "span": [20.0, 31.0]}]}]


def _swift(user_text, answer, videos=("videos/OHOFG.mp4",)):
    return {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "<video>" + user_text},
                         {"role": "assistant", "content": answer}],
            "videos": list(videos)}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_timelens_bench_json(tmp_path):
    samples = data.load_annotations(_write(tmp_path, "charades-timelens.json", json.dumps(BENCH)),
                                    video_root="/bench/videos/charades")
    assert [(s.video, s.query, s.span, s.duration) for s in samples] == [
        ("/bench/videos/charades/v_one.mp4", "A man runs across the field", (2.0, 7.6), 30.0),  # TimeLens's cleaning
        ("/bench/videos/charades/v_one.mp4", "a dog barks", (10.0, 20.0), 30.0),
        ("/bench/videos/charades/v_two.mp4", "someone opens a door", (0.0, 4.0), 12.5)]
    assert [s.id for s in samples] == ["v_one#0", "v_one#1", "v_two#0"]


def test_timelens_100k_jsonl(tmp_path):
    path = _write(tmp_path, "timelens-100k.jsonl", "".join(json.dumps(r) + "\n" for r in HUNDRED_K))
    samples = data.load_annotations(path, video_root="/data/TimeLens-100K/videos")
    assert [(s.video, s.query, s.span, s.duration) for s in samples] == [
        ("/data/TimeLens-100K/videos/cosmo_cap/abc.mp4", "the cat jumps", (3.0, 9.5), 40.0),  # nested: its first
        ("/data/TimeLens-100K/videos/cosmo_cap/abc.mp4", "the cat sleeps", (20.0, 31.0), 40.0)]


def test_swift_messages_rows(tmp_path):
    rows = [_swift(data.PROMPT.format(query="a person sits on a chair by a table."),
                   "The event happens in 1.0 - 7.5 seconds."),
            _swift(data.PROMPT.format(query="the person's phone rings"), "The event happens in 8.0 - 12.0 seconds.")]
    samples = data.load_annotations(_write(tmp_path, "opd_train.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert [(s.query, s.span, s.duration) for s in samples] == [
        ("a person sits on a chair by a table", (1.0, 7.5), None), ("the person's phone rings", (8.0, 12.0), None)]
    assert samples[0].video == str(tmp_path / "videos" / "OHOFG.mp4")


@pytest.mark.parametrize("row, words", [
    (_swift("Where does the man run?", "The event happens in 1.0 - 7.5 seconds."), "no TimeLens instruction"),
    (_swift(data.PROMPT.format(query="q"), "I cannot tell."), "no '<start> - <end>' answer"),
    (_swift(data.PROMPT.format(query="q"), "The event happens in 1.0 - 7.5 seconds.", videos=("a.mp4", "b.mp4")),
     "2 videos"),
])
def test_swift_rows_that_cannot_be_read_are_refused_in_one_line(tmp_path, row, words):
    path = _write(tmp_path, "bad.jsonl", json.dumps(row) + "\n")
    with pytest.raises(data.DataError) as err:
        data.load_annotations(path)
    assert path in str(err.value) and "line 1" in str(err.value) and words in str(err.value)


# ----------------------------------------------------------------------------- TimeLens's scorer
@pytest.mark.parametrize("answer, spans", [
    ("The event happens in 12.5 - 20.3 seconds.", [(12.5, 20.3)]),
    ("The event happens in 12.5 to 20.3 seconds.", [(12.5, 20.3)]),
    ("from 00:01:05 to 00:01:30", [(65.0, 90.0)]),                  # clock times first
    ("Starting time: 0.8 seconds. Ending time: 1.1 seconds", [(0.8, 1.1)]),  # any two numbers, last
    ("3 - 5 seconds, 7 - 9 seconds.", [(3.0, 5.0), (7.0, 9.0)]),
    ("30 - 20 seconds", [(30.0, 20.0)]),                            # inverted, as written
    ("starts at 5s and ends at 12s", []),                           # a number glued to a letter is no number
    ("happens at 12 seconds", []),
])
def test_timelens_parser(answer, spans):
    assert ev.timelens_spans(answer) == spans


def test_timelens_metrics_hand_worked():
    """Five answers to four distinct (video, query, span) keys:
    1. v1 'a man runs.'  gt 2.0-7.6: '2.4 - 7.5' -> rounded 2-8 (round(7.5) = 8): IoU 5.6 / 6.0 = 0.9333
    2. v1 'a man runs'   gt 2.0-7.6: the same key once cleaned, so 1. is replaced: '2.5 - 6.5' -> 2-6 (half to
       even: round(2.5) = 2, round(6.5) = 6): IoU 4.0 / 5.6 = 0.7143
    3. v2 'q'            gt 10.0-12.0, duration 20: 'no idea' -> [30, 40]: IoU 0
    4. v3 'r'            gt 3.2-4.4: '3.4 to 4.4' -> 3-4: IoU 0.8 / 1.4 = 0.5714
    5. v4 's'            gt 0.4-0.6: '0.4 - 0.6' -> 0-1: IoU 0.2 / 1.0 = 0.2; unrounded it would be 1.0
    R1@0.3 = 2 of 4, R1@0.5 = 2 of 4, R1@0.7 = 1 of 4; mIoU = (0.7143 + 0 + 0.5714 + 0.2) / 4."""
    S = data.Sample
    samples = [S("/a/v1.mp4", "a man runs.", (2.0, 7.6), 30.0, "v1#0"), S("/a/v1.mp4", "a man runs", (2.0, 7.6),
                                                                           30.0, "v1#1"),
               S("/a/v2.mp4", "q", (10.0, 12.0), 20.0, "v2#0"), S("/a/v3.mp4", "r", (3.2, 4.4), 9.0, "v3#0"),
               S("/a/v4.mp4", "s", (0.4, 0.6), 5.0, "v4#0")]
    answers = ["The event happens in 2.4 - 7.5 seconds.", "2.5 - 6.5", "no idea", "3.4 to 4.4", "0.4 - 0.6"]
    out = ev.timelens_metrics(answers, samples)
    assert out["R1@0.3"] == pytest.approx(50.0) and out["R1@0.5"] == pytest.approx(50.0)
    assert out["R1@0.7"] == pytest.approx(25.0)
    assert out["mIoU"] == pytest.approx(100 * (4.0 / 5.6 + 0 + 0.8 / 1.4 + 0.2) / 4)
    ours = ev.compute_metrics([data.parse_span(a) for a in answers], [s.span for s in samples])
    # ours: no rounding, every answer counted: IoU 0.91, 0.71, 0, 0.83, 1.0, so 4 of 5 at >= 0.7, against 1 of 4
    assert ours["R1@0.7"] == pytest.approx(80.0)


def test_the_port_agrees_with_timelens_own_code_on_random_answers():
    """TimeLens's own extract_time and iou (tests/data/timelens, copied unchanged) with its eval script's fallback,
    rounding and keys and compute_metrics' counting, against eval.timelens_spans / timelens_metrics."""
    import importlib.util
    import os
    import random
    from conftest import TESTS_DATA
    spec = importlib.util.spec_from_file_location("timelens_utils", TESTS_DATA / "timelens" / "utils.py")
    tl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tl)

    def reference(answers, samples):  # eval_dataloader.py, then compute_metrics.py
        results = {}
        for answer, s in zip(answers, samples):
            spans = tl.extract_time(answer) or [[s.duration + 10, s.duration + 20]]
            results[f"{os.path.basename(s.video)}>>>{data.clean_query(s.query)}>>>{list(s.span)}"] = [
                [round(a / 1.0) * 1.0, round(b / 1.0) * 1.0] for a, b in spans]
        ious = [tl.iou(eval(key.split(">>>")[2]), spans[0]) for key, spans in results.items()]
        out = {f"R1@{t}": sum(x >= t for x in ious) * 100 / len(ious) for t in ev.THRESHOLDS}
        return out | {"mIoU": sum(ious) * 100 / len(ious)}

    rng = random.Random(0)
    number = lambda: str(rng.choice([rng.randint(0, 200), round(rng.uniform(0, 200), rng.choice([1, 2]))]))
    clock = lambda: rng.choice(["{}:{:02d}", "00:{}:{:02d}"]).format(rng.randint(0, 59), rng.randint(0, 59))
    forms = ["The event happens in {a} - {b} seconds.", "{a} to {b}", "from {a}s to {b}s", "between {a} and {b}",
             "Starting time: {a} seconds. Ending time: {b} seconds", "no idea", "at {a} seconds", "{a} - {b}, or {c} - {d}",
             "<{a} seconds> - <{b} seconds>", "It Happens In {a} To {b}"]
    for _ in range(100):
        samples, answers = [], []
        for i in range(rng.randint(1, 20)):
            duration = rng.uniform(5, 200)
            start = round(rng.uniform(0, duration - 1), 1)
            span = (start, round(rng.uniform(start + 0.1, duration), 1))
            video, query = f"/v/{rng.randint(0, 4)}.mp4", rng.choice(["a man runs.", "a man runs", " a dog  barks ", "x"])
            samples.append(data.Sample(video, query, span, round(duration, 2), f"{i}"))
            part = clock if rng.random() < 0.2 else number
            answers.append(rng.choice(forms).format(a=part(), b=part(), c=part(), d=part()))
        assert [ev.timelens_spans(a) for a in answers] == [[tuple(p) for p in tl.extract_time(a)] for a in answers]
        assert ev.timelens_metrics(answers, samples) == pytest.approx(reference(answers, samples))
