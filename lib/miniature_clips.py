"""The miniature's clips (lib/miniature.py builds the rest): mp4 files read like Charades videos, and their annotations.

Coloured shapes, each visible during its own whole-second interval; the query names one ("the red circle"), its
interval is the answer. make_clips writes train/val/test in data.py's plain JSONL, make_noisy the noisy pool,
make_probe the two-event clips that ask whether a model reads the query.
"""
import dataclasses
import json
import os
import random

import numpy as np
from tqdm import tqdm

import data
import eval as ev

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 240)}
SHAPES = ("circle", "square", "triangle")


def _draw(img, shape, colour, cx, cy, r):
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    if shape == "circle":
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        m = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
    else:
        m = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)
    img[m] = colour


def make_clip(path, rng, cfg):
    """Write one clip; return [(query, (start, end))] for its shapes (distinct colours, own intervals).

    Each shape fills its own quadrant of the frame (one 16x16 vision patch) and the grey background brightens second
    by second: with small shapes tiny models sat on a constant answer (docs/LOG.md).
    """
    import av
    colours = rng.sample(list(COLOURS), cfg.shapes)
    quadrants = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], cfg.shapes)
    half = cfg.frame // 2
    objs = []
    for c, (qy, qx) in zip(colours, quadrants):
        length = rng.randint(1, max(1, cfg.seconds // 2))
        start = rng.randint(0, cfg.seconds - length)
        objs.append((rng.choice(SHAPES), c, qx * half + half // 2, qy * half + half // 2, half // 2 - 1,
                     start, start + length))
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=cfg.src_fps, options={"crf": "8", "preset": "ultrafast"})
        stream.width = stream.height = cfg.frame
        stream.pix_fmt = "yuv420p"
        for i in range(cfg.seconds * cfg.src_fps):
            second = i // cfg.src_fps
            img = np.full((cfg.frame, cfg.frame, 3), 10 + 160 * second // cfg.seconds, np.uint8)
            for shape, c, x, y, r, s, e in objs:
                if s <= second < e:
                    _draw(img, shape, COLOURS[c], x, y, r)
            for pkt in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)
    return [(f"the {c} {shape}", (float(s), float(e))) for shape, c, x, y, r, s, e in objs]


def make_clips(out, cfg):
    """Clips + train.jsonl/test.jsonl/val.jsonl (one query per clip, every clip its own) under `out`. Video paths are
    relative to the annotation file (data.load_annotations reads them so), so the folder can move or ship."""
    rng = random.Random(cfg.seed)
    os.makedirs(f"{out}/videos", exist_ok=True)
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test), ("val", cfg.n_val)):
        samples = []
        for i in tqdm(range(n), desc=f"clips ({split})"):
            path = f"{out}/videos/{split}{i:05d}.mp4"
            query, span = rng.choice(make_clip(path, rng, cfg))
            samples.append(data.Sample(os.path.relpath(path, out), query, span, float(cfg.seconds), f"{split}{i:05d}"))
        data.write_jsonl(samples, f"{out}/{split}.jsonl")


def make_probe(out, cfg):
    """probe.jsonl: cfg.probe_clips clips with two events, each clip asked for both (ids CLIP#0, CLIP#1, in pairs).
    Not for training: it measures whether a model reads the query (query_dependence)."""
    rng = random.Random(cfg.seed + 3)
    two = dataclasses.replace(cfg, shapes=2)
    os.makedirs(f"{out}/videos", exist_ok=True)
    samples = []
    for i in range(cfg.probe_clips):
        path = f"{out}/videos/probe{i:05d}.mp4"
        for j, (query, span) in enumerate(make_clip(path, rng, two)):
            video = os.path.relpath(path, out)
            samples.append(data.Sample(video, query, span, float(cfg.seconds), f"probe{i:05d}#{j}"))
    data.write_jsonl(samples, f"{out}/probe.jsonl")


def make_noisy(out, cfg):
    """train_noisy.jsonl: train.jsonl with a cfg.noisy_share of its spans replaced by a wrong one (a random span
    of IoU < 0.3 with the truth); noisy.json lists those ids with both spans. Why (ours): real annotations are noisy
    (20% is our stand-in, not a measured rate), and TVDF's TRPV drops such samples; the clean file is the default.
    """
    rng = random.Random(cfg.seed + 2)
    samples, wrong = data.load_annotations(f"{out}/train.jsonl"), {}
    for i in rng.sample(range(len(samples)), round(cfg.noisy_share * len(samples))):
        s = samples[i]
        while True:
            start = rng.randint(0, cfg.seconds - 1)
            span = (float(start), float(rng.randint(start + 1, min(cfg.seconds, start + cfg.seconds // 2))))
            if ev.iou(span, s.span) < 0.3:
                break
        wrong[s.id] = {"given": span, "true": s.span}
        samples[i] = dataclasses.replace(s, span=span)
    data.write_jsonl([dataclasses.replace(s, video=os.path.relpath(s.video, out)) for s in samples],
                     f"{out}/train_noisy.jsonl")
    with open(f"{out}/noisy.json", "w") as f:
        json.dump(wrong, f, indent=0)


def save_strip(sample, path, scale=4):
    """One clip's frames, one per second, side by side as a PNG (made docs/miniature_clip.png)."""
    from PIL import Image
    frames, _ = data.load_video(sample.video)
    strip = np.concatenate(list(frames[::2]), 1)  # one frame per second
    Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST).save(path)
