"""data.py: annotation formats, video decoding, the prompt's timestamps, answer parsing."""
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from conftest import TESTS_DATA, shared_file


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# ============================================================================= annotations
def test_charades_txt(tmp_path):
    path = write(tmp_path, "charades_sta_test.txt",
                 "3MSZA 24.3 30.4##person turn a light on.\n"
                 "\n"
                 "3MSZA 0 5.5##person opens the door\n"
                 "AO8RW 0.0 6.9##a person is putting a book on a shelf.\n")
    s = data.load_annotations(path)
    assert [x.query for x in s] == ["person turn a light on.", "person opens the door",
                                    "a person is putting a book on a shelf."]
    assert [x.span for x in s] == [(24.3, 30.4), (0.0, 5.5), (0.0, 6.9)]
    assert [x.id for x in s] == ["3MSZA#0", "3MSZA#1", "AO8RW#0"]
    assert s[0].video == str(tmp_path / "3MSZA.mp4")  # id -> <annotation folder>/ID.mp4
    assert s[0].duration is None


def test_charades_txt_video_root_and_ext(tmp_path):
    path = write(tmp_path, "a.txt", "3MSZA 1 2##q\n")
    s = data.load_annotations(path, video_root="/videos", video_ext=".avi")
    assert s[0].video == "/videos/3MSZA.avi"


def test_json_layout(tmp_path):
    path = write(tmp_path, "a.json", json.dumps({
        "v_abc": {"duration": 20.0, "timestamps": [[1.0, 4.5], [10, 25.0]], "sentences": ["one.", " two. "]},
        "v_def": {"duration": 8.0, "timestamps": [[0, 3]], "sentences": ["three."]}}))
    s = data.load_annotations(path)
    assert [(x.id, x.query, x.span, x.duration) for x in s] == [
        ("v_abc#0", "one.", (1.0, 4.5), 20.0), ("v_abc#1", "two.", (10.0, 20.0), 20.0),  # clamped to duration
        ("v_def#0", "three.", (0.0, 3.0), 8.0)]
    assert s[2].video == str(tmp_path / "v_def.mp4")


def test_qvhighlights(tmp_path):
    path = write(tmp_path, "qv.jsonl", jsonl([
        {"qid": 1, "query": "a man talks", "vid": "abc", "duration": 150, "relevant_windows": [[0, 4], [10, 20]]},
        {"qid": 2, "query": "a dog runs", "vid": "def", "duration": 150, "relevant_windows": [[100, 160]]}]))
    s = data.load_annotations(path)
    # several windows per query: each one is a ground-truth span
    assert [(x.query, x.span, x.id) for x in s] == [("a man talks", (0.0, 4.0), "abc#0"),
                                                   ("a man talks", (10.0, 20.0), "abc#1"),
                                                   ("a dog runs", (100.0, 150.0), "def#0")]
    assert s[0].video == str(tmp_path / "abc.mp4")


def test_qvhighlights_real_vid_names(tmp_path):
    path = write(tmp_path, "qv.jsonl", jsonl([
        {"qid": 1, "query": "q", "vid": "NUsG9BgSes0_210.0_360.0", "duration": 150, "relevant_windows": [[0, 4]]}]))
    s = data.load_annotations(path)
    assert s[0].video == str(tmp_path / "NUsG9BgSes0_210.0_360.0.mp4")
    assert s[0].id == "NUsG9BgSes0_210.0_360.0#0"


def test_plain_jsonl_and_roundtrip(tmp_path):
    path = write(tmp_path, "a.jsonl", jsonl([
        {"video": "clips/x.mp4", "query": "q1", "span": [1, 2]},
        {"video": "/abs/y.webm", "query": "q2", "span": [0.5, 3.25], "duration": 10}]))
    s = data.load_annotations(path)
    assert s[0].video == str(tmp_path / "clips" / "x.mp4") and s[0].duration is None
    assert s[1].video == "/abs/y.webm" and s[1].span == (0.5, 3.25) and s[1].duration == 10.0
    assert [x.id for x in s] == ["x#0", "y#0"]
    out = str(tmp_path / "b.jsonl")
    data.write_jsonl(s, out)
    assert data.load_annotations(out) == s


def test_clamp_and_drop_counted_and_printed_once(tmp_path, capsys):
    path = write(tmp_path, "a.json", json.dumps({
        "v1": {"duration": 10.0, "timestamps": [[1, 12], [2, 3], [5, 5], [11, 14], [7, 30]],
               "sentences": ["past end", "fine", "empty", "starts after end", "past end too"]}}))
    s = data.load_annotations(path)
    assert [(x.query, x.span) for x in s] == [("past end", (1.0, 10.0)), ("fine", (2.0, 3.0)),
                                             ("past end too", (7.0, 10.0))]
    assert all(x.span[1] <= x.duration for x in s)
    out = capsys.readouterr().out
    # [11, 14] is clamped to [11, 10] and then dropped: counted in both
    assert out.count("clamped") == 1 and "clamped 3 span ends" in out and "dropped 2 spans" in out
    assert path in out


def test_nothing_printed_when_nothing_clamped(tmp_path, capsys):
    data.load_annotations(write(tmp_path, "a.txt", "V 1 2##q\n"))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name, text, where", [
    ("unknown.txt", "hello world\nsecond line\n", "unknown annotation format"),
    ("keys.jsonl", jsonl([{"foo": 1, "bar": 2}]), "unknown annotation format"),
    ("empty.txt", "", "unknown annotation format"),
    ("emptyq.jsonl", jsonl([{"video": "a.mp4", "query": "q", "span": [1, 2]},
                            {"video": "a.mp4", "query": "  ", "span": [1, 2]}]), "line 2: empty query"),
    ("emptyq.json", json.dumps({"v1": {"duration": 9, "timestamps": [[1, 2], [3, 4]], "sentences": ["q", ""]}}),
     "key v1[1]: empty query"),
    ("emptyq.txt", "V 1 2##q\nV 3 4##\n", "line 2: empty query"),
    ("nan.jsonl", jsonl([{"video": "a.mp4", "query": "q", "span": ["one", 2]}]), "line 1"),
    ("nospans.jsonl", jsonl([{"video": "a.mp4", "query": "q", "span": [3, 2]},
                             {"video": "a.mp4", "query": "q", "span": [4, 4]}]), "no usable spans"),
])
def test_bad_annotations_raise_dataerror_naming_the_file(tmp_path, name, text, where):
    path = write(tmp_path, name, text)
    with pytest.raises(data.DataError) as err:
        data.load_annotations(path)
    assert path in str(err.value) and where in str(err.value)


def test_missing_annotation_file(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(data.DataError, match=re.escape(path)):
        data.load_annotations(path)


@pytest.mark.parametrize("name, text", [
    ("short.txt", "V 1 2##q\nV 1##missing end\n"),
    ("badjson.jsonl", jsonl([{"video": "a.mp4", "query": "q", "span": [1, 2]}]) + "{not json\n"),
    ("nokey.jsonl", jsonl([{"video": "a.mp4", "query": "q", "span": [1, 2]}, {"video": "a.mp4", "span": [1, 2]}])),
    ("shortspan.jsonl", jsonl([{"video": "a.mp4", "query": "q", "span": [1, 2]},
                               {"video": "a.mp4", "query": "q", "span": [1]}])),
    ("nosentences.json", json.dumps({"v1": {"duration": 9, "timestamps": [[1, 2]]}})),
    ("scalar.jsonl", "42\n"),
    ("list.jsonl", '[{"a": 1}, {"b": 2}]\n'),
])
def test_malformed_rows_raise_dataerror(tmp_path, name, text):
    path = write(tmp_path, name, text)
    with pytest.raises(data.DataError, match=re.escape(path)):
        data.load_annotations(path)


def test_json_sentences_timestamps_mismatch(tmp_path):
    path = write(tmp_path, "a.json", json.dumps(
        {"v1": {"duration": 9, "timestamps": [[1, 2], [3, 4]], "sentences": ["only one"]}}))
    with pytest.raises(data.DataError, match="v1"):
        data.load_annotations(path)


def test_real_charades_sta(shared, capsys):
    s = data.load_annotations(str(shared_file(shared, "charades_sta_test.json")))
    assert len(s) == 3720
    assert len({x.id for x in s}) == 3720 and len({x.video for x in s}) == 1334
    assert all(x.duration is not None and 0 <= x.span[0] < x.span[1] <= x.duration for x in s)
    assert "clamped 562 span ends" in capsys.readouterr().out
    ohofg = [x for x in s if x.id.startswith("OHOFG#")]
    assert len(ohofg) == 6 and ohofg[0].video == str(shared / "data" / "OHOFG.mp4")
    assert any(x.query == "person sitting down in a chair." and x.span == (1.0, 7.5) for x in ohofg)


def test_real_activitynet(shared, capsys):
    s = data.load_annotations(str(shared_file(shared, "activitynet_captions_val_2.json")))
    assert len(s) == 17031  # none dropped: every start is before its (clamped) end
    assert len({x.id for x in s}) == 17031 and len({x.video for x in s}) == 4885
    assert all(0 <= x.span[0] < x.span[1] <= x.duration for x in s)
    assert "clamped 111 span ends" in capsys.readouterr().out


# ============================================================================= video
def test_load_video_tiny():
    # tests/data/tiny.mp4: 32x32, 10 frames at 5 fps; frame i has red = 25 * i
    frames, meta = data.load_video(str(TESTS_DATA / "tiny.mp4"))
    assert frames.dtype == np.uint8 and frames.shape == (4, 32, 32, 3)
    assert meta["total_num_frames"] == 10 and meta["fps"] == pytest.approx(5.0)
    assert meta["duration"] == pytest.approx(2.0) and (meta["width"], meta["height"]) == (32, 32)
    idx = np.array(meta["frames_indices"])
    assert len(idx) == 4 and np.allclose(idx / 5.0, [0, 0.5, 1.0, 1.5], atol=0.5 / 5.0 + 1e-9)
    # the returned frames really are the indexed ones
    assert np.allclose(frames[:, 31, 16, 0].astype(float), 25 * idx, atol=8)


def test_load_video_tiny_max_frames():
    frames, meta = data.load_video(str(TESTS_DATA / "tiny.mp4"), max_frames=3)
    assert len(frames) == 2 and meta["frames_indices"] == [0, 9]  # spread over the whole clip, kept even


def test_load_video_ohofg(ohofg):
    frames, meta = ohofg
    fps = meta["fps"]
    assert fps == pytest.approx(9.53, abs=0.05) and meta["duration"] == pytest.approx(35.1, abs=0.1)
    assert (meta["width"], meta["height"]) == (640, 360) and meta["video_backend"] == "decord"
    assert frames.shape == (70, 360, 640, 3) and frames.dtype == np.uint8 and len(frames) % 2 == 0
    idx = np.array(meta["frames_indices"])
    assert len(idx) == len(frames) and (idx[1:] > idx[:-1]).all() and idx[-1] < meta["total_num_frames"]
    assert np.allclose(idx / fps, np.arange(len(idx)) / 2.0, atol=0.5 / fps + 1e-9)  # 0, 0.5, 1.0, ... seconds


@pytest.mark.parametrize("max_frames, n", [(16, 16), (15, 14)])
def test_load_video_ohofg_max_frames(ohofg_path, max_frames, n):
    frames, meta = data.load_video(str(ohofg_path), max_frames=max_frames)
    idx = meta["frames_indices"]
    assert len(frames) == len(idx) == n
    assert idx[0] == 0 and idx[-1] == meta["total_num_frames"] - 1  # evenly over the whole video


def test_load_video_missing(tmp_path):
    path = str(tmp_path / "missing.mp4")
    with pytest.raises(data.DataError, match=re.escape(path)):
        data.load_video(path)


@pytest.mark.parametrize("content", [b"this is not a video" * 50, b""])
def test_load_video_corrupt(tmp_path, content):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(content)
    with pytest.raises(data.DataError) as err:
        data.load_video(str(path))
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "Stack trace" not in msg and len(msg) < 400


# ============================================================================= prompt and timestamps
def test_timestamps_in_prompt_match_frame_times(shared, ohofg, tiny_processor):  # shared first: skip early
    """The `<t seconds>` stamps are mean(frame_index / source_fps) over each pair of frames (transformers #43519)."""
    frames, meta = ohofg
    sample = data.Sample(str(shared / "data" / "OHOFG.mp4"), "person sitting down in a chair.", (1.0, 7.5), 35.1,
                         "OHOFG#1")
    batch = data.encode(tiny_processor, [sample], [(frames, meta)])
    text = tiny_processor.tokenizer.decode(batch["input_ids"][0])
    stamps = re.findall(r"<(\d+\.\d) seconds>", text)
    times = np.array(meta["frames_indices"]) / meta["fps"]
    expected = [f"{(a + b) / 2:.1f}" for a, b in zip(times[0::2], times[1::2])]
    assert len(stamps) == len(frames) // 2 == 35
    assert stamps == expected
    assert stamps[:3] == ["0.3", "1.3", "2.3"]  # not the fps=24 fallback (0.0, 0.1, 0.2 ...)
    assert abs(float(stamps[-1]) - 34.3) <= 0.2
    # the TimeLens instruction, and mm_token_type_ids marking exactly the video pads
    assert data.PROMPT.format(query=sample.query) in text
    ids, types = batch["input_ids"][0], batch["mm_token_type_ids"][0]
    pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert ((types == 2) == (ids == pad)).all() and (types == 2).any()
    assert set(types.unique().tolist()) == {0, 2}
    assert batch["video_grid_thw"][0, 0].item() == 35


def test_encode_left_pads_prompts_and_right_pads_answers(tiny_processor, tiny):
    samples = data.load_annotations(tiny["test"])[:2]
    samples[1] = data.Sample(samples[1].video, samples[1].query + " that is much longer than the first",
                             samples[1].span, samples[1].duration, samples[1].id)
    videos = [data.load_video(s.video) for s in samples]
    batch = data.encode(tiny_processor, samples, videos)
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # generation prompts end together
    answers = [data.ANSWER.format(start=s.span[0], end=s.span[1]) for s in samples]
    batch = data.encode(tiny_processor, samples, videos, answers=answers)
    mask = batch["attention_mask"]
    assert mask[:, 0].all() and mask[0, -1] == 0
    text = tiny_processor.tokenizer.decode(batch["input_ids"][1][mask[1].bool()])
    assert text.endswith(answers[1] + "<|im_end|>")


# ============================================================================= answers
@pytest.mark.parametrize("text, span", [
    ("The event happens in 12.5 - 18 seconds", (12.5, 18.0)),
    ("The event happens in 12.5 - 18.0 seconds.", (12.5, 18.0)),
    ("12.5 to 18", (12.5, 18.0)),
    ("from 1:05 to 1:10", (65.0, 70.0)),
    ("00:01:02 - 00:01:05.5", (62.0, 65.5)),
    ("It happens 3.0–7.5 s into the clip", (3.0, 7.5)),   # en-dash
    ("between 4 and 9 seconds", (4.0, 9.0)),
    ("The event happens in 3 - 5 seconds, or maybe 7 - 9 seconds", (3.0, 5.0)),  # first span wins
    ("The event happens in 9.0 - 2.0 seconds", (9.0, 2.0)),  # inverted: returned as written, scored 0
    ("The event happens in 1.0 seconds - 7.5 seconds.", (1.0, 7.5)),  # a unit after each number
    ("1.0s to 7.5s", (1.0, 7.5)),
    ("The event happens in <1.0 seconds> - <7.5 seconds>", (1.0, 7.5)),  # the prompt's own stamp style
    ("from 3.5 sec until 7 sec", (3.5, 7.0)),
    ("no span here", None),
    ("only one number: 12.5 seconds", None),
    ("", None),
    (None, None),
])
def test_parse_span(text, span):
    assert data.parse_span(text) == span


times = st.floats(min_value=0, max_value=1e5, allow_nan=False, allow_infinity=False)


@settings(deadline=None, max_examples=200)
@given(times, times)
def test_parse_span_answer_roundtrip(a, b):
    a, b = min(a, b), max(a, b)
    start, end = data.parse_span(data.ANSWER.format(start=a, end=b))
    assert abs(start - a) <= 0.05 + 1e-9 and abs(end - b) <= 0.05 + 1e-9


@settings(deadline=None, max_examples=200)
@given(st.integers(0, 99), st.integers(0, 59), st.integers(0, 99), st.integers(0, 59), st.integers(0, 9))
def test_parse_span_mmss_roundtrip(m1, s1, m2, s2, h):
    assert data.parse_span(f"from {m1}:{s1:02d} to {m2}:{s2:02d}") == (m1 * 60 + s1, m2 * 60 + s2)
    assert data.parse_span(f"{h:02d}:{m1 % 60:02d}:{s1:02d} - {h:02d}:{m2 % 60:02d}:{s2:02d}.5") == (
        h * 3600 + (m1 % 60) * 60 + s1, h * 3600 + (m2 % 60) * 60 + s2 + 0.5)
