"""neighbours/va_opd.py: the degraded view, the visual advantage, the rollout weights, the token split, the loss,
a smoke run."""
import json
import math

import numpy as np
import pytest
import torch

import data
import rollout
from neighbours import va_opd
from test_opd import _run, _weights


def test_degrade_is_blocky_same_shape_and_matches_manual():
    """scale 0.5 on 4 x 4: bilinear (no anti-aliasing) samples each 2 x 2 block's centre = its mean; nearest back."""
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 64, (2, 4, 4, 3)) * 4).astype(np.uint8)  # block means are whole numbers
    out = va_opd.degrade(frames, 0.5)
    means = frames.reshape(2, 2, 2, 2, 2, 3).astype(float).mean((2, 4))  # [N, 2, 2, 3]
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert np.array_equal(out, means.repeat(2, 1).repeat(2, 2).astype(np.uint8))
    # the miniature's 32 x 32 frames at 10%: 3 x 3 blocks of 11, 10, 11 pixels (nearest-exact), one colour each
    big = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    low = va_opd.degrade(big, 0.1)
    assert low.shape == big.shape and not np.array_equal(low, big)
    for rows in (slice(0, 11), slice(11, 21), slice(21, 32)):
        for cols in (slice(0, 11), slice(11, 21), slice(21, 32)):
            block = low[:, rows, cols]
            assert (block == block[:, :1, :1]).all()


def test_degraded_video_keeps_token_layout_and_changes_teacher(teacher, tiny_test):
    """Only the pixels differ (the processor makes the same patches and tokens), and the teacher's log-probs of
    the ground-truth answer move where the answer rests on the video: on the timestamp digits, not the template."""
    model, processor = teacher
    samples, videos = tiny_test
    clean, low = (data.encode(processor, samples, v) for v in (videos, [(va_opd.degrade(f), m) for f, m in videos]))
    assert clean.keys() == low.keys()
    assert all(torch.equal(clean[k], low[k]) for k in clean if k != "pixel_values_videos")
    assert not torch.allclose(clean["pixel_values_videos"], low["pixel_values_videos"])
    answers = [data.ANSWER.format(start=s.span[0], end=s.span[1]) for s in samples]
    tokens = processor.tokenizer(answers, return_tensors="pt", padding=True, padding_side="right")  # completions
    ids, mask = tokens.input_ids, tokens.attention_mask
    forbidden = rollout.forbidden_ids(processor)
    with torch.no_grad():
        seqs = [rollout.append_completion(p, ids, mask) for p in (clean, low)]
        logits = [rollout.completion_logits(model, s, ids.shape[1], 1.0, forbidden) for s in seqs]
        a, b = (rollout.token_logp(x, ids) for x in logits)
    # a time is its digits and points and the " seconds" that ends it: whether "8.0" ends there or goes on is
    # the time's own question (measured: 5.5e-4 on " seconds" after "8.0", the clip's last second)
    time = torch.tensor([[t == "Ġseconds" or (t.strip("Ġ") != "" and set(t.strip("Ġ")) <= set("0123456789."))
                          for t in processor.tokenizer.convert_ids_to_tokens(row)] for row in ids])
    change = (a - b).abs() * mask
    # the template ("The event happens in", " -") is the same whatever the video: its log-probs move only by the
    # changed features' ripple (measured: up to 1.5e-5, vs up to 2.9e-3 on the times; one confident sample may
    # barely move at all, so the 4 samples count together)
    assert change[time].max() > 10 * change[~time].max(), change


def test_visual_advantage_is_clamped_masked_and_detached():
    clean = torch.tensor([[-0.5, -2.0, -1.0], [-0.1, -0.2, -3.0]], requires_grad=True)
    degraded = torch.tensor([[-1.5, -1.0, -1.0], [-2.1, -0.2, -4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    va = va_opd.visual_advantage(clean, degraded, mask)
    assert torch.allclose(va, torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    assert not va.requires_grad


def test_va_weights_are_softmax_of_group_z_scores():
    # prompt 0: mean VA 1, 2, 3 (row 0's padded 9 is not counted); prompt 1: all equal
    va = torch.tensor([[1.0, 1.0, 9.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0],
                       [0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    w = va_opd.va_weights(va, mask, group=3)
    z = 1 / (math.sqrt(2 / 3) + 1e-6)  # (3 - 2) / population std of (1, 2, 3)
    e = [math.exp(-z), 1.0, math.exp(z)]
    assert torch.allclose(w[:3], torch.tensor([x / sum(e) for x in e]), atol=1e-6)
    assert torch.allclose(w[3:], torch.full((3,), 1 / 3))
    assert torch.allclose(w.view(2, 3).sum(1), torch.ones(2))
    assert torch.allclose(va_opd.va_weights(va, mask, group=1), torch.ones(6))  # one rollout per prompt: weight 1


def test_va_split_takes_top_ceil_fraction_of_each_rollouts_real_tokens():
    va = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2, 7.0],    # T 5: ceil(1.0) = 1; the padded 7.0 is not a token
                       [0.1, 0.5, 0.3, 0.9, 0.2, 0.4],    # T 6: ceil(1.2) = 2
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],    # T 1: ceil(0.2) = 1, the low group is empty
                       [0.3, 0.2, 0.1, 0.0, 0.0, 0.0]])   # T 0: nothing
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6])
    high = va_opd.va_split(va, mask, 0.2)
    assert high.int().tolist() == [[0, 0, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0], [0] * 6]
    assert va_opd.va_split(va, mask, 0.5).sum(1).tolist() == [3, 3, 1, 0]


def test_va_opd_loss_equals_brute_force():
    torch.manual_seed(2)
    K, T, V = 2, 6, 5
    s, t = torch.randn(2 * K, T, V), torch.randn(2 * K, T, V)
    s[..., 1], t[..., 1] = float("-inf"), float("-inf")  # a forbidden token
    va = torch.rand(2 * K, T)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    kl = torch.zeros(2 * K, T)
    for b in range(2 * K):
        for i in range(T):
            ps, pt = torch.softmax(s[b, i], -1), torch.softmax(t[b, i], -1)
            keep = ps > 0
            kl[b, i] = (ps[keep] * (ps[keep].log() - pt[keep].log())).sum()
    total = 0.0
    for p in range(2):
        rows = range(p * K, p * K + K)
        means = [va[b][mask[b].bool()].mean().item() for b in rows]
        mu = sum(means) / K
        sd = math.sqrt(sum((m - mu) ** 2 for m in means) / K)
        e = [math.exp((m - mu) / (sd + 1e-6)) for m in means]
        for b, ek in zip(rows, e):
            real = [i for i in range(T) if mask[b, i]]
            n = math.ceil(0.2 * len(real))
            top = sorted(real, key=lambda i: -va[b, i].item())[:n]
            low = [i for i in real if i not in top]
            part = 0.5 * kl[b, top].mean().item() + (0.5 * kl[b, low].mean().item() if low else 0.0)
            total += ek / sum(e) * part
    for chunk in (1, 4, 16):
        loss = va_opd.va_opd_loss(s, t, va, mask, K, 0.2, chunk)
        assert loss.item() == pytest.approx(total / 2, rel=1e-5)
    x = s.clone().requires_grad_(True)
    va_opd.va_opd_loss(x, t, va, mask, K).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[..., 1] == 0).all()
    assert (x.grad[1, 3:] == 0).all() and x.grad[1, :3].abs().sum() > 0  # padded positions get no gradient


def test_smoke_va_two_steps(tiny, tmp_path):
    out = _run("neighbours.va_opd", tiny, tmp_path, "--steps", "2", "--rollouts-per-prompt", "2")
    assert "student after" in out
    steps = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["grad_norm"] > 0 and steps[0]["loss"] > 0
    a, start = _weights(tmp_path / "final"), _weights(tiny["student"])
    assert any(not torch.equal(a[k], start[k]) for k in a)
