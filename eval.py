"""The field's metrics for temporal video grounding, VISD's judge, and evaluating a model on a dataset.

    python eval.py [--model M] [--data ANNOTATIONS] [--video-root DIR] [--out runs/eval/NAME]
    python eval.py --compare runs/opd runs/grpo [...] [--baseline runs/grpo | --target MIOU]
                   [--compare-out runs/compare]

With no --model/--data it evaluates the shipped miniature teacher on the miniature test set.
Prints R1@0.3/0.5/0.7 and mIoU, ours and TimeLens's scorer (timelens_metrics: how the paper's TimeLens-Bench numbers
are made); writes one JSON line per query to OUT/preds.jsonl beside OUT/setup.json (model,
data, decoding settings); an interrupted run resumes there, and only with the same setup.
--compare reads training runs' log.jsonl files and prints/plots their evaluation curves side by side (lib/report.py).
"""
import argparse
import functools
import json
import os
import re

import torch
from tqdm import tqdm

import data
import rollout
from lib import fsdp, report

THRESHOLDS = (0.3, 0.5, 0.7)


# ----------------------------------------------------------------------------- metrics
def iou(a, b):
    """Temporal IoU of two (start, end) spans; 0 when either is None or inverted (TimeLens' protocol)."""
    if a is None or b is None or a[0] >= a[1] or b[0] >= b[1]:
        return 0.0
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def compute_metrics(pred_spans, gt_spans):
    """Lists of spans (a prediction may be None) -> {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"} in percent."""
    if not gt_spans:
        raise ValueError("no predictions to score (every sample skipped?)")
    return recalls([iou(p, g) for p, g in zip(pred_spans, gt_spans, strict=True)])


def recalls(ious):
    """IoUs -> {"R1@0.3", "R1@0.5", "R1@0.7" (the share at or above each threshold), "mIoU"} in percent."""
    out = {f"R1@{t}": 100.0 * sum(x >= t for x in ious) / len(ious) for t in THRESHOLDS}
    out["mIoU"] = 100.0 * sum(ious) / len(ious)
    return out


# TencentARC/TimeLens @ 5d90c06: timelens/utils.py (extract_time, iou), evaluation/eval_dataloader.py (the fallback,
# the rounding, the key), evaluation/compute_metrics.py (the metrics). Ported, not imported: TimeLens is no package.
_CLOCK = re.compile(r"\b(\d{1,2}:\d{2}:\d{2}(?:\.\d+)?|\d{1,2}:\d{2}(?:\.\d+)?)\b")
_PAIRS = (re.compile(r"(\d+\.?\d*)\s*-\s*(\d+\.?\d*)"), re.compile(r"(\d+\.?\d*)\s+to\s+(\d+\.?\d*)"))
_ANY = re.compile(r"\b(\d+\.\d+|\d+)\b")


def timelens_spans(answer):
    """TimeLens's extract_time: every (start, end) in an answer, by the first rule that finds any: clock times
    (mm:ss, hh:mm:ss) paired in order; then 'a - b'; then 'a to b'; then any numbers paired in order."""
    text = answer.lower()
    clocks = _CLOCK.findall(text)
    clocks = [data.to_seconds(t) for t in clocks[:len(clocks) // 2 * 2]]
    if clocks:
        return list(zip(clocks[::2], clocks[1::2]))
    for pattern in _PAIRS:
        found = pattern.findall(text)
        if found:
            return [(float(s), float(e)) for s, e in found]
    numbers = [float(x) for x in _ANY.findall(text)]
    numbers = numbers[:len(numbers) // 2 * 2]
    return list(zip(numbers[::2], numbers[1::2]))


def timelens_iou(gt, pred):
    """TimeLens's iou: overlap over the hull of the two spans (0 for an inverted or empty prediction; TimeLens
    divides by zero where both spans are the same point, here 0)."""
    hull = max(gt[1], pred[1]) - min(gt[0], pred[0])
    return max(min(gt[1], pred[1]) - max(gt[0], pred[0]), 0) / hull if hull > 0 else 0.0


def timelens_metrics(answers, samples):
    """R1@0.3/0.5/0.7 and mIoU in percent, exactly as TimeLens scores TimeLens-Bench from these answer strings:
    its parser (timelens_spans, the first pair counts), an unparsable answer as [duration + 10, duration + 20],
    predictions rounded to whole seconds (Python's round: half to even) before the IoU, the ground truth as it is,
    and one result per (video file name, query, span): a repeated key keeps its last answer, and counts once."""
    results = {}
    for answer, s in zip(answers, samples, strict=True):
        spans = timelens_spans(answer) or [(s.duration + 10, s.duration + 20)]
        pred = [float(round(t)) for t in spans[0]]
        key = f"{os.path.basename(s.video)}>>>{data.clean_query(s.query)}>>>{list(s.span)}"
        results[key] = timelens_iou(s.span, pred)
    return recalls(list(results.values()))


def format_table(rows):
    """{name: metrics} -> a small aligned text table."""
    keys = [f"R1@{t}" for t in THRESHOLDS] + ["mIoU"]
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + "".join(f"{k:>9}" for k in keys)]
    lines += [f"{n:<{width}}" + "".join(f"{m[k]:9.1f}" for k in keys) for n, m in rows.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- rewards and the judge
def rollout_ious(processor, ids, mask, samples):
    """Temporal IoU of each completion's first span with its sample's ground truth: GRPO's reward, OPD's log."""
    return [iou(data.parse_span(a), s.span) for a, s in zip(rollout.decode(processor, ids, mask), samples, strict=True)]


def judge(answer, sample, tolerance=0.25):
    """VISD's judge, for grounding: an answer checked dimension by dimension against what it can be checked against.

    answer correctness     the IoU with the ground truth
    logical consistency    a span in the answer's format, start before end, inside the video
    temporal grounding     each boundary's error, its direction and size, and where the boundary really is
    -> {"iou", "consistent", "start_error", "end_error" (answer - truth in s; None without a span), "feedback"}:
    feedback is the verdict as one line of text, the teacher's privileged information (visd.py), e.g.
    "Judge: IoU 0.33; a span, start before end; start 2.0 s too early, it is 4.0; end correct, it is 6.0."
    Ours: VISD's judge is an LLM writing free text; the tolerance (0.25 s, half the miniature's answer grid) too; and
    each boundary's true value is always named, so that reading the feedback is one skill (feedback_prompts in
    lib/miniature.py).
    """
    truth = sample.span
    span = data.parse_span(answer)
    if span is None:
        return {"iou": 0.0, "consistent": False, "start_error": None, "end_error": None,
                "feedback": f"Judge: IoU 0.00; no span in the answer's format; the event is {truth[0]:.1f} - "
                            f"{truth[1]:.1f} seconds."}
    consistent = span[0] < span[1] and span[0] >= 0 and (sample.duration is None or span[1] <= sample.duration)
    order = "start before end" if span[0] < span[1] else "start not before end"
    place = "" if consistent or span[0] >= span[1] else ", outside the video"
    parts = [f"IoU {iou(span, truth):.2f}", f"a span, {order}{place}"]
    for name, guess, real in (("start", span[0], truth[0]), ("end", span[1], truth[1])):
        error = guess - real
        verdict = "correct" if abs(error) <= tolerance else f"{abs(error):.1f} s too {'late' if error > 0 else 'early'}"
        parts.append(f"{name} {verdict}, it is {real:.1f}")
    return {"iou": iou(span, truth), "consistent": consistent, "start_error": span[0] - truth[0],
            "end_error": span[1] - truth[1], "feedback": "Judge: " + "; ".join(parts) + "."}


# ----------------------------------------------------------------------------- predictions over a dataset
def predict(model, processor, samples, batch_size=8, max_new_tokens=32, skip_bad=False, temperature=None,
            desc="predict", fps=2.0, max_frames=256, num_workers=0):
    """Answer every sample -> one dict per usable sample, in the samples' order: id, query, gt, answer, pred, iou.

    Greedy by default; with `skip_bad` an unreadable video is skipped and counted instead of stopping the run.
    num_workers: DataLoader processes decoding and encoding the next batches. Under torchrun each rank answers its
    share (shard) and every rank returns all the rows (fsdp.gather).
    """
    mine = shard(len(samples), batch_size)
    loader = torch.utils.data.DataLoader([[(j, samples[j]) for j in b] for b in mine], batch_size=None,
                                         num_workers=num_workers, collate_fn=functools.partial(
                                             _encoded, processor, skip_bad, fps, max_frames))
    rows, bad = {}, 0
    for kept, batch, skipped in tqdm(loader, total=len(mine), desc=desc, leave=False):
        bad += skipped
        if batch is None:
            continue
        ids, mask = rollout.generate(model, processor, batch, max_new_tokens, temperature)
        for (j, s), answer in zip(kept, rollout.decode(processor, ids, mask)):
            pred = data.parse_span(answer)
            rows[j] = {"id": s.id, "query": s.query, "gt": list(s.span), "answer": answer,
                       "pred": list(pred) if pred else None, "iou": iou(pred, s.span)}
    if bad:
        print(f"skipped {bad} samples with unreadable videos")
    rows = {j: row for part in fsdp.gather(rows) for j, row in part.items()}
    return [rows[j] for j in sorted(rows)]


def shard(n, batch_size):
    """This rank's batches of sample indices 0..n-1: every world-th index from its rank on, repeated at the end so that
    every rank runs the same number of generate calls (FSDP: each is collective); a repeat answers again, once."""
    mine = list(range(fsdp.rank(), n, fsdp.world())) or [0]
    mine += mine[-1:] * (-(-n // fsdp.world()) - len(mine))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def _encoded(processor, skip_bad, fps, max_frames, batch):
    """[(index, Sample)] -> (the ones whose video decoded, their encoded prompts or None, how many were skipped)."""
    videos, errors = data.load_videos([s for _, s in batch], skip_bad, fps, max_frames)
    kept = [(item, v) for item, v in zip(batch, videos) if v is not None]
    if not kept:
        return [], None, len(errors)
    items = [item for item, _ in kept]
    return items, data.encode(processor, [s for _, s in items], [v for _, v in kept]), len(errors)


def evaluate(model, processor, samples, **kw):
    """Greedy metrics of a model on samples -> (metrics dict, prediction rows)."""
    rows = predict(model, processor, samples, **kw)
    return compute_metrics([r["pred"] for r in rows], [r["gt"] for r in rows]), rows


# ----------------------------------------------------------------------------- CLI
def parse_args():
    """eval.py's command line -> args, its numbers checked and the shipped miniature filled in where none named."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = data.refuse
    p.add_argument("--model", help="hub id or local folder (default: the miniature teacher)")
    p.add_argument("--data", help="annotation file, any format data.load_annotations reads (default: miniature test)")
    p.add_argument("--video-root", help="folder holding the videos (default: the annotation file's folder)")
    p.add_argument("--out", help="run folder: preds.jsonl (one JSON line per query), setup.json, metrics.json; "
                   "an unfinished one is resumed (default: runs/eval/MODEL-DATA)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds other predictions")
    p.add_argument("--batch-size", type=int, default=8, help="queries per generate call")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second sampled from each video (paper: 2)")
    p.add_argument("--max-frames", type=int, default=768, help="frame cap per video (official code: 768, as training)")
    p.add_argument("--skip-bad", action="store_true", help="skip missing or unreadable videos (counted) instead of "
                   "stopping")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="compare training runs (folders with log.jsonl)")
    p.add_argument("--compare-out", default="runs/compare", help="writes COMPARE_OUT.json and COMPARE_OUT.png")
    p.add_argument("--target", type=float, help="time-to-target mIoU (default: the weakest run's best, or with "
                   "--baseline its best)")
    p.add_argument("--baseline", metavar="CONFIG", help="time-to-target the paper's way: the target is CONFIG's best "
                   "mIoU (mean over its seeds CONFIG-sN) unless --target is given, and compare.json gets each "
                   "configuration's time ratio to CONFIG's")
    args = p.parse_args()
    if args.compare:
        return args
    for flag in ("batch_size", "max_new_tokens", "max_frames"):
        if getattr(args, flag) < 1:
            raise data.DataError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.model:
        rollout.check_model("model", args.model)
    if not args.model or not args.data:  # the shipped miniature's (lib/miniature.py imports this file)
        mini = os.path.join(os.path.dirname(os.path.abspath(__file__)), "miniature")
        args.model, args.data = args.model or f"{mini}/teacher", args.data or f"{mini}/test.jsonl"
    return args


def resumed(out, setup, total):
    """The prediction rows an unfinished run in `out` holds ([] if none); a DataError if another setup made them."""
    preds = os.path.join(out, "preds.jsonl")
    if not os.path.exists(preds):
        return []
    saved = os.path.join(out, "setup.json")
    before = json.load(open(saved)) if os.path.exists(saved) else {}
    if before != setup:
        diff = ", ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in setup.items() if before.get(k) != v)
        raise data.DataError(f"{out} holds predictions made with other settings ({diff}): --overwrite starts "
                             "afresh, or choose another --out")
    with open(preds) as f:
        done = [json.loads(line) for line in f if line.strip()]
    print(f"resuming: {len(done)} of {total} queries already in {preds}")
    return done


def main():
    args = parse_args()
    if args.compare:
        os.makedirs(os.path.dirname(os.path.abspath(args.compare_out)), exist_ok=True)
        return report.compare(args.compare, args.compare_out, args.target, args.baseline)
    samples = data.load_samples(args.data, args.video_root, args.skip_bad)
    # the predictions belong to what produced them: resuming with another model, data or decoding never mixes
    setup = {"model": os.path.abspath(args.model) if os.path.isdir(args.model) else args.model,
             "data": os.path.abspath(args.data), "video_root": args.video_root, "max_new_tokens": args.max_new_tokens,
             "fps": args.fps, "max_frames": args.max_frames}
    name = lambda path: os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    out = args.out or os.path.join("runs", "eval", f"{name(args.model)}-{name(args.data)}")
    preds = os.path.join(out, "preds.jsonl")
    done = [] if args.overwrite else resumed(out, setup, len(samples))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "setup.json"), "w") as f:
        json.dump(setup, f, indent=1)
    finished = {r["id"] for r in done}
    todo = [s for s in samples if s.id not in finished]
    model, processor = rollout.load_model(args.model)
    with open(preds, "w" if args.overwrite else "a") as f:
        for i in tqdm(range(0, len(todo), args.batch_size), desc="eval"):
            for row in predict(model, processor, todo[i:i + args.batch_size], args.batch_size, args.max_new_tokens,
                               args.skip_bad, fps=args.fps, max_frames=args.max_frames):
                f.write(json.dumps(row) + "\n")
                done.append(row)
            f.flush()
    metrics = compute_metrics([r["pred"] for r in done], [r["gt"] for r in done])
    by_id = {s.id: s for s in samples}
    timelens = timelens_metrics([r["answer"] for r in done], [by_id[r["id"]] for r in done])
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics | {"queries": len(done), "timelens": timelens}, f, indent=1)
    name = os.path.basename(args.model.rstrip("/"))
    print(format_table({f"{name} ({len(done)} queries), ours": metrics, f"{name}, TimeLens's scorer": timelens}))
    print("ours: parse_span, the IoU of the answer as written; TimeLens's scorer (the paper's TimeLens-Bench numbers): "
          "its parser, answers rounded to whole seconds, repeated queries once")
    print(f"wrote {out}/preds.jsonl and metrics.json")


if __name__ == "__main__":
    data.run(main)
