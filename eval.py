"""Decoding, scoring and the field's metrics for temporal video grounding.

    python eval.py [--model M] [--data ANNOTATIONS] [--video-root DIR] [--out runs/eval/NAME]
    python eval.py --compare runs/opd runs/grpo [...] [--baseline runs/grpo | --target MIOU]
                   [--compare-out runs/compare]

With no --model/--data it evaluates the shipped miniature teacher on the miniature test set.
Prints R1@0.3/0.5/0.7 and mIoU; writes one JSON line per query to OUT/preds.jsonl beside OUT/setup.json (model,
data, decoding settings); an interrupted run resumes there, and only with the same setup.
--compare reads training runs' log.jsonl files and prints/plots their evaluation curves side by side.
"""
import argparse
import json
import os
import re

import numpy as np

import torch
from tqdm import tqdm
from transformers import BatchFeature, GenerationConfig

import data

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
    ious = [iou(p, g) for p, g in zip(pred_spans, gt_spans, strict=True)]
    out = {f"R1@{t}": 100.0 * sum(x >= t for x in ious) / len(ious) for t in THRESHOLDS}
    out["mIoU"] = 100.0 * sum(ious) / len(ious)
    return out


def format_table(rows):
    """{name: metrics} -> a small aligned text table."""
    keys = [f"R1@{t}" for t in THRESHOLDS] + ["mIoU"]
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + "".join(f"{k:>9}" for k in keys)]
    lines += [f"{n:<{width}}" + "".join(f"{m[k]:9.1f}" for k in keys) for n, m in rows.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- models and decoding
def load_model(name_or_path, device=None, dtype=None):
    """A hub id or a local folder -> (model, processor). bf16 on GPU, fp32 on CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    return model, processor


def check_model(flag, name):
    """A model is an existing folder holding config.json or a hub id ("org/name"); else a DataError saying which
    (before anything loads: from_pretrained's own error for a missing folder is about hub ids)."""
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise data.DataError(f"--{flag} {name}: the folder holds no config.json (not a saved model)")
    elif os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise data.DataError(f"--{flag} {name}: no such model folder" + (
            "" if name.count("/") == 1 else " (and not a hub id of the form org/name)"))
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise data.DataError(f"--{flag} {name}: not a hub id (org/name of letters, digits, '-', '_', '.')")


def forbidden_ids(processor):
    """Vision special tokens: never sampled (a sampled <|video_pad|> breaks re-scoring) and so never scored."""
    tok = processor.tokenizer
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    ids = [tok.convert_tokens_to_ids(n) for n in names]
    return sorted({i for i in ids if i is not None and i != tok.unk_token_id})


def generate(model, processor, batch, max_new_tokens=32, temperature=None):
    """Greedy (temperature None) or pure sampling at `temperature` (top_k 0, top_p 1) with the KV cache.

    batch: left-padded inputs from data.encode, [B, L]. Vision tokens are suppressed.
    Returns completion ids [B, T] (padded after EOS) and their mask [B, T] (1 up to and including EOS).

    Sampling and scoring must be one distribution (completion_logits scores logits / temperature over the same
    support), so nothing else may touch the logits: the model generates in eval mode (in train mode, gradient
    checkpointing makes transformers drop the KV cache and the model writes garbage), and from a fresh
    GenerationConfig holding only the settings below. A checkpoint's own generation_config.json (real Qwen
    checkpoints ship top_k, top_p, temperature, some a repetition penalty) would otherwise fill in every setting
    left unset here.
    """
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id  # where an answer ends is the checkpoint's to say; how to sample, not
    eos = sorted(set(eos if isinstance(eos, list) else [eos]))
    config = GenerationConfig(max_new_tokens=max_new_tokens, suppress_tokens=forbidden_ids(processor),
                              eos_token_id=eos, pad_token_id=tok.pad_token_id, **(
                                  dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature
                                  else dict(do_sample=False)))
    batch = batch.to(model.device)
    was_training, saved = model.training, model.generation_config
    model.eval()
    model.generation_config = config  # generate fills unset values from model.generation_config: make it ours
    if hasattr(model, "unshard"):  # FSDP2 (torchrun): generate runs the vision tower outside the model's forward,
        model.unshard()            # so gather the top-level weights first
    try:
        with torch.no_grad():
            # synced_gpus: under torchrun + FSDP every rank must run the same number of forward passes, so a rank
            # whose answers are done keeps stepping until all are
            out = model.generate(**batch, generation_config=config, synced_gpus=torch.distributed.is_initialized())
    finally:
        model.generation_config = saved
        model.train(was_training)
    if hasattr(model, "reshard"):
        model.reshard()
    ids = out[:, batch["input_ids"].shape[1]:]
    mask = completion_mask(ids, eos)
    return ids.masked_fill(mask == 0, tok.pad_token_id), mask


def completion_mask(ids, eos_ids):
    """[B, T] -> 1 up to and including the first EOS, 0 after. Found by position, not by token, so the EOS
    stays in the loss even when pad == eos (trl PR #6357)."""
    is_eos = torch.isin(ids, torch.tensor(sorted(eos_ids), device=ids.device)).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def decode(processor, ids, mask):
    """Completion ids [B, T] -> answer strings (special tokens dropped)."""
    return [processor.tokenizer.decode(i[m.bool()], skip_special_tokens=True) for i, m in zip(ids, mask)]


def rollout_ious(processor, ids, mask, samples):
    """Temporal IoU of each completion's first span with its sample's ground truth: GRPO's reward, OPD's log."""
    return [iou(data.parse_span(a), s.span) for a, s in zip(decode(processor, ids, mask), samples, strict=True)]


def judge(answer, sample, tolerance=0.25):
    """VISD's judge, for grounding: an answer checked dimension by dimension against what it can be checked against.

    answer correctness     the IoU with the ground truth
    logical consistency    a span in the answer's format, start before end, inside the video
    temporal grounding     each boundary's error, its direction and size, and where the boundary really is
    -> {"iou", "consistent", "start_error", "end_error" (answer - truth in s; None without a span), "feedback"}:
    feedback is the verdict as one line of text, the teacher's privileged information (visd.py), e.g.
    "Judge: IoU 0.33; a span, start before end; start 2.0 s too early, it is 4.0; end correct, it is 6.0."
    Ours: VISD's judge is an LLM writing free text; the tolerance (0.25 s, half the miniature's answer grid) too; and
    each boundary's true value is always named, so that reading the feedback is one skill (toy.feedback_prompts).
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


# ----------------------------------------------------------------------------- rollouts and their log-probs
def expand(batch, n):
    """Repeat each prompt n times, keeping each video's patches next to its own <|video_pad|> tokens.

    batch: input_ids, attention_mask, mm_token_type_ids [B, L]; video_grid_thw [B, 3];
    pixel_values_videos [sum_i t_i*h_i*w_i, D]. Returns the same keys with B*n rows, prompt i at rows i*n..i*n+n-1.
    """
    if n == 1:
        return batch
    out = {k: v.repeat_interleave(n, 0) for k, v in batch.items() if k != "pixel_values_videos"}
    patches = batch["pixel_values_videos"].split(batch["video_grid_thw"].prod(-1).tolist())
    out["pixel_values_videos"] = torch.cat([p for p in patches for _ in range(n)])
    return BatchFeature(out)


def append_completion(batch, ids, mask):
    """Prompt batch [B, L] + completion ids/mask [B, T] -> one batch [B, L + T] for scoring (completion = text)."""
    seq = dict(batch)
    seq["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    seq["attention_mask"] = torch.cat([batch["attention_mask"], mask], 1)
    seq["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    return BatchFeature(seq)


def reprompt(processor, samples, videos, ids, mask, feedback=None):
    """The same completions ids, mask [B*G, T] behind a prompt built anew from B samples and their videos (G
    copies each): how VA-OPD's degraded video and VISD's judged prompt score the rollout's own tokens.
    feedback: one text per completion [B*G] (VISD's judge on that completion), added to its own prompt."""
    group = ids.shape[0] // len(samples)
    if feedback is None:
        prompt = expand(data.encode(processor, samples, videos), group)
    else:  # each completion its own prompt: left padding keeps every prompt's end next to its completion
        prompt = data.encode(processor, [s for s in samples for _ in range(group)],
                             [v for v in videos for _ in range(group)], feedback=feedback)
    return append_completion(prompt.to(ids.device), ids, mask)


def completion_logits(model, seq, T, temperature, forbidden, vocab=None):
    """Logits / temperature of the T completion positions only: [B, T, V].

    `logits_to_keep` makes the LM head run on the last T + 1 positions, so the [B, L, V] logits of a long video
    prompt never exist. Forbidden (vision) tokens get -inf: the support is the one sampling used. `vocab` slices
    a teacher whose embedding is padded larger than the student's (Qwen2.5-VL-3B 151,936 vs 7B 152,064 rows).
    """
    logits = model(**seq, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
    logits = logits[..., :vocab] if vocab else logits
    blocked = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    blocked[forbidden] = True
    return (logits / temperature).masked_fill(blocked, float("-inf"))


def token_logp(logits, ids):
    """log pi(a_t) of the chosen tokens: logits [B, T, V], ids [B, T] -> [B, T] in fp32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- predictions over a dataset
def load_videos(samples, skip_bad=False, fps=2.0, max_frames=256):
    """Decode each sample's video -> (list of (frames, metadata) or None, list of DataError messages)."""
    videos, errors = [], []
    for s in samples:
        try:
            videos.append(data.load_video(s.video, fps=fps, max_frames=max_frames))
        except data.DataError as err:
            if not skip_bad:
                raise
            videos.append(None)
            errors.append(str(err))
    return videos, errors


def predict(model, processor, samples, batch_size=8, max_new_tokens=32, skip_bad=False, temperature=None,
            desc="predict", fps=2.0, max_frames=256):
    """Answer every sample -> one dict per usable sample: id, query, gt, answer, pred, iou.

    Greedy by default; with `skip_bad` an unreadable video is skipped and counted instead of stopping the run.
    """
    rows, bad = [], 0
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        chunk = samples[i:i + batch_size]
        videos, errors = load_videos(chunk, skip_bad, fps, max_frames)
        bad += len(errors)
        chunk, videos = zip(*[(s, v) for s, v in zip(chunk, videos) if v is not None]) if len(errors) < len(chunk) \
            else ((), ())
        if not chunk:
            continue
        ids, mask = generate(model, processor, data.encode(processor, chunk, videos), max_new_tokens, temperature)
        for s, answer in zip(chunk, decode(processor, ids, mask)):
            pred = data.parse_span(answer)
            rows.append({"id": s.id, "query": s.query, "gt": list(s.span), "answer": answer,
                         "pred": list(pred) if pred else None, "iou": iou(pred, s.span)})
    if bad:
        print(f"skipped {bad} samples with unreadable videos")
    return rows


def evaluate(model, processor, samples, **kw):
    """Greedy metrics of a model on samples -> (metrics dict, prediction rows)."""
    rows = predict(model, processor, samples, **kw)
    return compute_metrics([r["pred"] for r in rows], [r["gt"] for r in rows]), rows


# ----------------------------------------------------------------------------- comparing training runs
def compare(runs, out="compare", target=None, baseline=None):
    """Runs' log.jsonl -> table (steps, wall, best/final mIoU and R1@0.5, time-to-target) + compare.json/.png.

    Time-to-target, the paper's way (its Fig. 6: OPD's training cost to reach GRPO's accuracy): with `baseline` (a
    configuration: runs named BASELINE-s0, BASELINE-s1, ... or one run BASELINE), the target is the baseline's best
    mIoU, mean over its seeds; each run's time_to_target_s is the training wall-clock (evaluation excluded) at its
    first evaluation at or above it (NaN if never), and compare.json's "ratio" holds, per configuration, the mean
    and std of time_to_target_s / the baseline's mean time_to_target_s over the seeds that reach the target, and
    how many do. Without a baseline the target is `target` (an mIoU) or else the weakest run's best mIoU.
    """
    curves, costs = {}, {}
    for run in runs:
        with open(os.path.join(run, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        evals = [r for r in records if "eval" in r]
        if not evals:
            raise SystemExit(f"{run}/log.jsonl has no evaluation records")
        curves[run] = evals
        steps = [r for r in records if "time" in r]
        split = {k: float(np.mean([r["time"][k] for r in steps])) for k in steps[0]["time"]} if steps else {}
        costs[run] = {"s_per_step": sum(split.values()), **{f"{k}_s": v for k, v in split.items()},
                      "other_%": 100 * split.get("other", 0) / max(sum(split.values()), 1e-9),
                      "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steps])) if steps else 0.0}
    config = lambda run: re.sub(r"-s\d+$", "", run.rstrip("/"))  # runs NAME-s0, NAME-s1, ...: seeds of NAME
    if baseline is not None:
        base_runs = [r for r in curves if config(r) == baseline.rstrip("/")]
        if not base_runs:
            raise data.DataError(f"--baseline {baseline}: none of the runs is it or one of its seeds (NAME-sN)")
        target = float(np.mean([max(e["eval"]["mIoU"] for e in curves[r]) for r in base_runs]))
    elif target is None:
        target = min(max(e["eval"]["mIoU"] for e in evals) for evals in curves.values())
    summary = {}
    for run, evals in curves.items():
        hit = next((e for e in evals if e["eval"]["mIoU"] >= target), {"step": float("nan"), "wall": float("nan")})
        summary[run] = {"steps": evals[-1]["step"], "wall_s": evals[-1]["wall"],
                        "best_mIoU": max(e["eval"]["mIoU"] for e in evals), "final_mIoU": evals[-1]["eval"]["mIoU"],
                        "best_R1@0.5": max(e["eval"]["R1@0.5"] for e in evals),
                        "final_R1@0.5": evals[-1]["eval"]["R1@0.5"],
                        "target_mIoU": target, "target_step": hit["step"], "time_to_target_s": hit["wall"]}
    ratio = {}
    if baseline is not None:
        base_time = float(np.nanmean([summary[r]["time_to_target_s"] for r in base_runs]))
        if base_time == 0:  # its best is its start (step 0): every run is "there" at 0 s
            print(f"{baseline}'s best mIoU is its start: there is no time to it, so no ratio (NaN)")
        for name in dict.fromkeys(config(r) for r in summary):
            times = [summary[r]["time_to_target_s"] for r in summary if config(r) == name]
            reached = [t / base_time for t in times if t == t] if base_time > 0 else []  # NaN: never
            ratio[name] = {"mean": float(np.mean(reached or [np.nan])), "std": float(np.std(reached or [np.nan])),
                           "reached": sum(t == t for t in times), "seeds": len(times)}
    width = max(len(r) for r in runs) + 2

    def show(name, table, cell):  # {row: {column: value}} -> aligned text, one line per row
        print(f"{name:<{width}}" + "".join(f"{c:>14}" for c in next(iter(table.values()))))
        for row, values in table.items():
            print(f"{row:<{width}}" + "".join(cell(v) for v in values.values()))

    show("run", summary, lambda v: f"{v:14.1f}")
    print("\nwhere a training step's time goes (mean seconds per step)")
    show("run", costs, lambda v: f"{v:14.3f}")
    groups = {}
    for run, row in summary.items():
        groups.setdefault(config(run), []).append(row)
    cols = list(next(iter(summary.values())))
    seeds = {g: {k: (float(np.nanmean([r[k] for r in rows])), float(np.nanstd([r[k] for r in rows]))) for k in cols}
             for g, rows in groups.items() if len(rows) > 1}
    if seeds:
        print("\nmean ± std over seeds")
        show("config", seeds, lambda v: f"{v[0]:8.1f} ±{v[1]:4.1f}")
    if ratio:
        print(f"\ntime to {baseline}'s best mIoU ({target:.1f}), over {baseline}'s "
              "(mean ± std over seeds; NaN: never)")
        for name, r in ratio.items():
            print(f"{name:<{width}}{r['mean']:8.2f} ±{r['std']:5.2f}   "
                  f"({r['reached']} of {r['seeds']} seeds reach it)")
    with open(out + ".json", "w") as f:
        json.dump({"runs": summary, "seeds": seeds, "step_time": costs, "baseline": baseline, "target_mIoU": target,
                   "ratio": ratio}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table only, no plot")
        return summary
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, evals in curves.items():
        for ax, x in zip(axes, ("step", "wall")):
            ax.plot([e[x] for e in evals], [e["eval"]["mIoU"] for e in evals], marker=".", label=run)
    for ax, label in zip(axes, ("optimizer step", "training wall-clock (s)")):
        ax.set_xlabel(label), ax.set_ylabel("test mIoU"), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    print(f"wrote {out}.json and {out}.png")
    return summary


# ----------------------------------------------------------------------------- CLI
def main():
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
    p.add_argument("--fps", type=float, default=2.0, help="frames per second sampled from each video")
    p.add_argument("--max-frames", type=int, default=256, help="frame cap per video")
    p.add_argument("--skip-bad", action="store_true", help="skip missing or unreadable videos (counted) instead of "
                   "stopping")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="compare training runs (folders with log.jsonl)")
    p.add_argument("--compare-out", default="runs/compare", help="writes COMPARE_OUT.json and COMPARE_OUT.png")
    p.add_argument("--target", type=float, help="time-to-target mIoU (default: the weakest run's best)")
    p.add_argument("--baseline", metavar="CONFIG", help="time-to-target the paper's way: the target is CONFIG's best "
                   "mIoU (mean over its seeds CONFIG-sN), and compare.json gets each configuration's time ratio")
    args = p.parse_args()
    if args.compare:
        os.makedirs(os.path.dirname(os.path.abspath(args.compare_out)), exist_ok=True)
        return compare(args.compare, args.compare_out, args.target, args.baseline)
    for flag in ("batch_size", "max_new_tokens", "max_frames"):
        if getattr(args, flag) < 1:
            raise data.DataError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.model:
        check_model("model", args.model)
    if not args.model or not args.data:  # the shipped miniature's (toy.py imports this file, so not toy.MINIATURE)
        mini = os.path.join(os.path.dirname(os.path.abspath(__file__)), "miniature")
        args.model, args.data = args.model or f"{mini}/teacher", args.data or f"{mini}/test.jsonl"
    samples = data.load_samples(args.data, args.video_root, args.skip_bad)
    # the predictions belong to what produced them: resuming with another model, data or decoding never mixes
    setup = {"model": os.path.abspath(args.model) if os.path.isdir(args.model) else args.model,
             "data": os.path.abspath(args.data), "video_root": args.video_root, "max_new_tokens": args.max_new_tokens,
             "fps": args.fps, "max_frames": args.max_frames}
    name = lambda path: os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    out = args.out or os.path.join("runs", "eval", f"{name(args.model)}-{name(args.data)}")
    preds = os.path.join(out, "preds.jsonl")
    done = []
    if os.path.exists(preds) and not args.overwrite:
        saved = os.path.join(out, "setup.json")
        before = json.load(open(saved)) if os.path.exists(saved) else {}
        if before != setup:
            diff = ", ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in setup.items() if before.get(k) != v)
            raise data.DataError(f"{out} holds predictions made with other settings ({diff}): --overwrite starts "
                                 "afresh, or choose another --out")
        with open(preds) as f:
            done = [json.loads(line) for line in f if line.strip()]
        print(f"resuming: {len(done)} of {len(samples)} queries already in {preds}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "setup.json"), "w") as f:
        json.dump(setup, f, indent=1)
    finished = {r["id"] for r in done}
    todo = [s for s in samples if s.id not in finished]
    model, processor = load_model(args.model)
    with open(preds, "w" if args.overwrite else "a") as f:
        for i in tqdm(range(0, len(todo), args.batch_size), desc="eval"):
            for row in predict(model, processor, todo[i:i + args.batch_size], args.batch_size, args.max_new_tokens,
                               args.skip_bad, fps=args.fps, max_frames=args.max_frames):
                f.write(json.dumps(row) + "\n")
                done.append(row)
            f.flush()
    metrics = compute_metrics([r["pred"] for r in done], [r["gt"] for r in done])
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics | {"queries": len(done)}, f, indent=1)
    print(format_table({os.path.basename(args.model.rstrip("/")) + f" ({len(done)} queries)": metrics}))
    print(f"wrote {out}/preds.jsonl and metrics.json")


if __name__ == "__main__":
    data.run(main)
