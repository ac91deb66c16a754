"""Everything between files on disk and model inputs.

annotations -> list[Sample]        load_annotations()
video file  -> frames + metadata   load_video()
Sample      -> prompt text         prompt_messages(), PROMPT
answer text -> (start, end)        parse_span()
samples     -> model inputs        encode()   (the model's own AutoProcessor; left-padded)

The prompt and answer format are the field's (TimeLens, followed by Video-OPD), without thinking.
"""
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

PROMPT = ("Please find the visual event described by the sentence '{query}', determining its starting and ending "
          "times. The format should be: 'The event happens in <start time> - <end time> seconds'.")
ANSWER = "The event happens in {start:.1f} - {end:.1f} seconds"  # the target text, for SFT and examples


@dataclass
class Sample:
    video: str                  # path to the video file
    query: str                  # the sentence to ground
    span: tuple[float, float]   # ground truth (start, end) in seconds
    duration: float | None      # video length in seconds, when the annotation gives it
    id: str                     # unique per query, e.g. "OHOFG#2"


class DataError(ValueError):
    """Bad input (a file, a flag, a model path), with a message that names it (and the line or key)."""


def refuse(message):
    """For argparse's error(): a bad flag is a DataError, so one line on stderr and exit code 2 (run), not the
    whole usage text."""
    raise DataError(message)


def run(main):
    """Every script's entry point: bad input (DataError) is one line on stderr and exit code 2, a traceback is
    kept for bugs. (During training, opd.train handles Ctrl-C and SIGTERM itself: it saves, then stops.)"""
    import sys
    try:
        main()
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)


# ----------------------------------------------------------------------------- annotations
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


def _detect_format(path, text):
    """The annotation format (FORMATS) from the file's content, not its name."""
    try:
        obj = json.loads(text)
        values = list(obj.values()) if isinstance(obj, dict) else []
        if values and all(isinstance(v, dict) and "timestamps" in v for v in values):
            return "json"
        if values and all(isinstance(v, dict) and {"spans", "queries"} <= set(v) for v in values):
            return "timelens_bench"
    except json.JSONDecodeError:
        pass
    first = next((line for line in text.splitlines() if line.strip()), "")
    if re.match(r"^\S+ \d+(\.\d+)? \d+(\.\d+)?##", first):
        return "charades_txt"
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        raise DataError(f"{path}: unknown annotation format (first line: {first[:80]!r})")
    keys = set(row) if isinstance(row, dict) else set()
    for fmt, needed in (("qvhighlights", {"relevant_windows"}), ("timelens_100k", {"video_path", "events"}),
                        ("swift", {"messages", "videos"}), ("jsonl", {"video", "query", "span"})):
        if needed <= keys:
            return fmt
    raise DataError(f"{path}: unknown annotation format (first line: {first[:80]!r})")


def _entries(text, fmt):
    """Yield (where, entry): one key of the JSON formats, or one non-empty line of the others."""
    if fmt in ("json", "timelens_bench"):
        yield from ((f"key {vid}", (vid, ann)) for vid, ann in json.loads(text).items())
    else:
        yield from ((f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip())


def _parse(fmt, entry):
    """One entry -> [(video, query, start, end, duration)]; raises KeyError/ValueError/... when malformed."""
    if fmt in ("json", "timelens_bench"):
        vid, ann = entry
        spans, queries = (ann["timestamps"], ann["sentences"]) if fmt == "json" else (ann["spans"], ann["queries"])
        if len(spans) != len(queries):
            raise ValueError(f"{len(spans)} spans but {len(queries)} queries")
        clean = clean_query if fmt == "timelens_bench" else str  # as TimeLens's loader does
        return [(vid, clean(q), s, e, ann.get("duration")) for (s, e), q in zip(spans, queries)]
    if fmt == "charades_txt":
        head, _, q = entry.partition("##")
        vid, s, e = head.split()
        return [(vid, q, s, e, None)]
    r = json.loads(entry)
    if fmt == "qvhighlights":  # several windows per query: each is a ground-truth span
        return [(r["vid"], r["query"], s, e, r.get("duration")) for s, e in r["relevant_windows"]]
    if fmt == "timelens_100k":  # a nested span list: its first span, as TimeLens's training reads it
        return [(r["video_path"], clean_query(ev["query"]), *_first_span(ev["span"]), r.get("duration"))
                for ev in r["events"]]
    if fmt == "swift":
        return [_swift_row(r)]
    return [(r["video"], r["query"], r["span"][0], r["span"][1], r.get("duration"))]


def _first_span(span):
    """[s, e] or [[s, e], ...] -> (s, e): TimeLens-100K's span, as TimeLens's training reads it."""
    (s, e) = span[0] if isinstance(span[0], (list, tuple)) else span
    return s, e


def _swift_row(r):
    """One ms-swift `messages` row (the official Video-OPD release) -> (video, query, start, end, duration). The
    query is the sentence in the user turn's TimeLens instruction (PROMPT); the span is the assistant turn's answer
    (the release keeps it nowhere else). Anything else is refused rather than guessed."""
    turns = {m["role"]: m["content"] for m in r["messages"]}
    text = lambda c: c if isinstance(c, str) else " ".join(part.get("text", "") for part in c)  # str or parts
    if len(r["videos"]) != 1:
        raise ValueError(f"{len(r['videos'])} videos; one per row is read")
    query = re.search(r"sentence '(.*)', determining", text(turns["user"]), re.S)
    if query is None:
        raise ValueError("the user turn holds no TimeLens instruction (\"... the sentence '<query>', determining\")")
    span = parse_span(text(turns["assistant"]))
    if span is None:
        raise ValueError("the assistant turn holds no '<start> - <end>' answer")
    return r["videos"][0], clean_query(query.group(1)), *span, r.get("duration")


def clean_query(query):
    """TimeLens's parse_query: whitespace runs to one space, leading and trailing dots and spaces dropped."""
    return re.sub(r"\s+", " ", query).strip().strip(".").strip()


def load_annotations(path, video_root=None, video_ext=".mp4"):
    """Read any of the four annotation formats into Samples.

    Formats (detected from the content): raw Charades-STA txt `VID START END##sentence`; JSON
    `{vid: {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}` (Charades-STA, ActivityNet Captions);
    QVHighlights JSONL (`query`, `vid`, `duration`, `relevant_windows`); plain JSONL (`video`, `query`, `span`,
    optional `duration`). A video id without a video extension becomes `video_root/ID.mp4`; relative paths are
    taken from `video_root` (default: the annotation file's folder). Ends past the video are clamped to its
    duration and spans with start >= end are dropped: both are counted and printed once.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: annotation file not found")
    with open(path) as f:
        text = f.read()
    fmt = _detect_format(path, text)
    root = video_root if video_root is not None else os.path.dirname(os.path.abspath(path))
    samples, clamped, dropped, seen = [], 0, 0, {}
    for where, entry in _entries(text, fmt):
        try:
            rows = _parse(fmt, entry)
        except (KeyError, IndexError, TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            raise DataError(f"{path}: {where}: malformed entry ({type(err).__name__}: {err})")
        for j, (vid, query, s, e, dur) in enumerate(rows):
            at = f"{where}[{j}]" if fmt == "json" else where
            try:
                s, e = float(s), float(e)
                dur = float(dur) if dur is not None else None
            except (TypeError, ValueError):
                raise DataError(f"{path}: {at}: span {s!r}-{e!r} is not a number")
            if query is None or not str(query).strip():
                raise DataError(f"{path}: {at}: empty query")
            if dur is not None and e > dur:
                e, clamped = dur, clamped + 1
            if s >= e:
                dropped += 1
                continue
            vid = str(vid)
            has_ext = os.path.splitext(vid)[1].lower() in VIDEO_EXTS  # QVHighlights ids hold dots: 'ID_210.0_360.0'
            video = vid if has_ext else vid + video_ext
            video = video if os.path.isabs(video) else os.path.join(root, video)
            base = os.path.basename(os.path.splitext(vid)[0] if has_ext else vid)
            seen[base] = seen.get(base, -1) + 1
            samples.append(Sample(video, str(query).strip(), (s, e), dur, f"{base}#{seen[base]}"))
    if clamped or dropped:
        print(f"{path}: clamped {clamped} span ends to the video duration, dropped {dropped} spans with start >= end")
    if not samples:
        raise DataError(f"{path}: no usable spans")
    return samples


def load_samples(path, video_root=None, skip_bad=False):
    """load_annotations, every video checked to exist. Missing videos are a DataError naming how many and the
    first few; with skip_bad those samples are left out (and counted)."""
    samples = load_annotations(path, video_root)
    missing = [s for s in samples if not os.path.exists(s.video)]
    if missing and not skip_bad:
        raise DataError(f"{path}: {len(missing)} of {len(samples)} videos not found, e.g. "
                        + ", ".join(s.video for s in missing[:3]) + " (--skip-bad goes on without them)")
    if missing:
        print(f"{path}: skipping {len(missing)} of {len(samples)} samples whose video is missing")
        samples = [s for s in samples if os.path.exists(s.video)]
        if not samples:
            raise DataError(f"{path}: no sample has its video")
    return samples


def write_jsonl(samples, path):
    """Samples -> the plain JSONL format (paths stay as given)."""
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps({"video": s.video, "query": s.query, "span": list(s.span),
                                "duration": s.duration, "id": s.id}) + "\n")


# ----------------------------------------------------------------------------- video
def load_video(path, fps=2.0, max_frames=256):
    """Decode frames sampled at `fps` (uniformly thinned to at most `max_frames`) with decord.

    Returns (frames uint8 [N, H, W, 3], metadata dict). N is even: Qwen-VL merges frames in temporal pairs.
    The metadata (source fps, sampled frame indices, total frames) is what the Qwen3-VL processor needs to write
    correct `<t seconds>` stamps: t = mean of frame_index / source_fps over each pair (transformers #43519).
    """
    import decord
    if not os.path.exists(path):
        raise DataError(f"{path}: video file not found")
    try:
        vr = decord.VideoReader(path, num_threads=1)
        total, src_fps = len(vr), float(vr.get_avg_fps())
    except Exception as err:  # decord raises its own error types from C++
        raise DataError(f"{path}: cannot read video ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    if total == 0 or src_fps <= 0:
        raise DataError(f"{path}: video has no frames")
    duration = total / src_fps
    n = max(2, min(int(duration * fps), max_frames))
    n -= n % 2
    if duration * fps > max_frames:  # too long for max_frames: spread them evenly over the whole video
        idx = np.linspace(0, total - 1, n)
    else:
        idx = np.arange(n) * src_fps / fps
    idx = idx.round().astype(int).clip(0, total - 1)
    try:
        frames = vr.get_batch(idx.tolist()).asnumpy()
    except Exception as err:
        raise DataError(f"{path}: cannot decode frames ({type(err).__name__})")
    h, w = frames.shape[1:3]
    meta = {"total_num_frames": total, "fps": src_fps, "frames_indices": idx.tolist(), "width": w, "height": h,
            "duration": duration, "video_backend": "decord"}
    return frames, meta


def load_videos(samples, skip_bad=False, fps=2.0, max_frames=256):
    """Decode each sample's video -> (list of (frames, metadata) or None, list of DataError messages)."""
    videos, errors = [], []
    for s in samples:
        try:
            videos.append(load_video(s.video, fps=fps, max_frames=max_frames))
        except DataError as err:
            if not skip_bad:
                raise
            videos.append(None)
            errors.append(str(err))
    return videos, errors


# ----------------------------------------------------------------------------- prompt and answer
def prompt_messages(query, feedback=None):
    """The chat for one query: a video, then the TimeLens instruction (then, for VISD's teacher, a judge's feedback
    on an answer: at the end of the user turn, where VISD's code puts its hint block, just before the answer)."""
    text = PROMPT.format(query=query) + (f"\n{feedback}" if feedback else "")
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


_NUM = r"(\d+(?::\d{1,2}){0,2}(?:\.\d+)?)"  # 12.5 | 1:05 | 01:02:03.5
_UNIT = r"\s*(?:s|secs?|seconds?)?\s*>?\s*"  # '1.0s', '1.0 seconds', '<1.0 seconds>' (the prompt's own style)
_SPAN = re.compile(_NUM + _UNIT + r"(?:-|–|—|to|and|until|till)\s*<?\s*" + _NUM, re.IGNORECASE)


def to_seconds(t):
    """'12.5' -> 12.5, '1:05' -> 65.0, '1:02:03' -> 3723.0."""
    out = 0.0
    for part in t.split(":"):
        out = out * 60 + float(part)
    return out


def parse_span(text):
    """The first '<start> - <end>' (or 'to', mm:ss, hh:mm:ss, a unit after each number) in an answer -> (start,
    end) seconds, else None.

    Inverted spans are returned as written: the metrics score them IoU 0, as TimeLens does. (TimeLens-Bench's own
    numbers come from TimeLens's parser: eval.timelens_metrics.)
    """
    m = _SPAN.search(text or "")
    return (to_seconds(m.group(1)), to_seconds(m.group(2))) if m else None


# ----------------------------------------------------------------------------- model inputs
def encode(processor, samples, videos, answers=None, feedback=None):
    """Samples + decoded videos -> one left-padded batch for the model, through its own processor.

    videos: list of (frames [N, H, W, 3], metadata) from load_video, one per sample.
    answers: optional target texts appended after the generation prompt (for SFT), each closed by the
    template's end-of-turn token; then padding is on the right so the answer tokens line up for the loss.
    feedback: optional text per sample added to its prompt (VISD's privileged teacher view, prompt_messages).
    Returns the processor's BatchFeature: input_ids, attention_mask [B, L]; mm_token_type_ids [B, L]
    (0 text, 2 video: carry it everywhere, without it the model silently uses 1-D positions);
    pixel_values_videos [sum_i t_i*h_i*w_i, D]; video_grid_thw [B, 3].
    """
    texts = [processor.apply_chat_template(prompt_messages(s.query, f), add_generation_prompt=True, tokenize=False)
             for s, f in zip(samples, feedback or [None] * len(samples), strict=True)]
    if answers is not None:
        end = processor.tokenizer.decode(_end_of_turn_id(processor))
        texts = [t + a + end for t, a in zip(texts, answers)]
    batch = processor(text=texts, videos=[v[0] for v in videos], video_metadata=[v[1] for v in videos],
                      do_sample_frames=False, padding=True, padding_side="left" if answers is None else "right",
                      return_tensors="pt")
    check_video_layout(processor, batch)
    return batch


def check_video_layout(processor, batch):
    """Refuse (DataError, one line) a processor that lays a video out otherwise than the model's own tooling.

    Qwen3-VL's own processor (the one released with the model; tests/data/chat_templates/SOURCES.md) turns the
    template's `<|vision_start|><|video_pad|><|vision_end|>` into `<t seconds><|vision_start|><|video_pad|>...
    <|vision_end|>` per temporal group of frames: one <|vision_start|> per group, each right before the pads.
    transformers 5.x before 5.25 (5.23, 5.24) also kept the template's pair around all groups, unseen in training;
    nothing errors, so it is checked here. Qwen2.5-VL: one pair per video, around its pads, no stamps.
    batch: data.encode's; one video per row (video_grid_thw [B, 3]).
    """
    tok = processor.tokenizer
    start, pad = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|video_pad|>")
    ids = batch["input_ids"]
    stamped = type(processor).__name__.startswith("Qwen3VL")  # Qwen3-VL writes `<t seconds>`, Qwen2.5-VL does not
    groups = batch["video_grid_thw"][:, 0] if stamped else torch.ones(len(ids), dtype=torch.long)
    is_start = ids[:, :-1] == start
    before_pads = (ids[:, 1:] == pad) | ~is_start  # every <|vision_start|> is followed by the video's pads
    if torch.equal(is_start.sum(1), groups) and before_pads.all():
        return
    import transformers
    row = int((~before_pads.all(1) | (is_start.sum(1) != groups)).nonzero()[0])
    shown = tok.decode(ids[row][ids[row] != tok.pad_token_id])[:160]
    raise DataError(f"transformers {transformers.__version__} lays out the video prompt as {shown!r}...: not the "
                    f"layout {type(processor).__name__}'s model was trained on (one <|vision_start|> per frame group, "
                    "right before its pads); install the versions in requirements.txt")


def _end_of_turn_id(processor):
    """The token that closes an assistant turn (`<|im_end|>` for Qwen)."""
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    return im_end if im_end is not None and im_end != tok.unk_token_id else tok.eos_token_id
