"""toy.py: the reduced build in the default suite; the full build's targets under `pytest -m slow`."""
import json
import os

import pytest

import data
import eval as ev
import toy


def test_reduced_build_gives_loadable_models_and_parseable_answers(tiny):
    report = json.load(open(tiny["metrics"]))
    assert {"teacher", "student", "build_seconds"} <= set(report)
    assert report["teacher"]["params"] > report["student"]["params"]  # a larger teacher, a smaller student
    model, processor = ev.load_model(tiny["teacher"])
    assert model.config.model_type == "qwen3_vl" and processor.__class__.__name__ == "Qwen3VLProcessor"
    samples = data.load_annotations(tiny["test"])
    assert all(s.duration == 8.0 and 0 <= s.span[0] < s.span[1] <= 8 for s in samples)
    # the clips are real video files decord reads, and the query names a colour and a shape
    frames, meta = data.load_video(samples[0].video)
    assert frames.shape[1:] == (32, 32, 3) and meta["fps"] == 4.0
    assert any(c in samples[0].query for c in toy.COLOURS) and any(s in samples[0].query for s in toy.SHAPES)
    # a parseable answer needs a model that learned the format: teach the reduced teacher the format in a few steps
    cfg = toy.ToyConfig.reduced()
    videos = [data.load_video(s.video) for s in samples]
    toy.sft(model, processor, samples, videos, 60, cfg, "format", eval_every=10**6)
    rows = ev.predict(model, processor, samples[:4])
    assert any(r["pred"] is not None for r in rows), [r["answer"] for r in rows]


def test_build_is_cached(tiny):
    mtime = os.path.getmtime(tiny["metrics"])
    assert toy.build(os.path.dirname(tiny["metrics"]), toy.ToyConfig.reduced()) == tiny
    assert os.path.getmtime(tiny["metrics"]) == mtime


def test_clip_shows_the_shape_during_its_interval_only(tmp_path):
    import random
    cfg = toy.ToyConfig(shapes=3)
    path = str(tmp_path / "c.mp4")
    objs = toy.make_clip(path, random.Random(1), cfg)
    frames, meta = data.load_video(path)
    times = [i / meta["fps"] for i in meta["frames_indices"]]
    for q, (s, e) in objs:
        channel = list(toy.COLOURS).index(q.split()[1])
        visible = [(f[..., channel].astype(int) - f.mean(-1) > 60).sum() > 20 for f in frames]
        assert visible == [s <= t < e for t in times], (q, s, e)


@pytest.mark.slow
def test_full_build_meets_its_targets(tmp_path):
    """The default miniature (minutes): a good teacher and a weaker student that still uses the video."""
    paths = toy.build(str(tmp_path / "toy"))
    m = json.load(open(paths["metrics"]))
    assert m["teacher"]["mIoU"] >= 75
    assert m["student"]["parseable"] >= 95 and m["student"]["distinct"] >= 10
    assert m["teacher"]["mIoU"] - m["student"]["mIoU"] >= 20
    assert m["student"]["sampled_reward_spread_%"] > 0
    assert m["build_seconds"] < 600
