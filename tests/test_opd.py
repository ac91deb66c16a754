"""opd.py: Eq. 5-6, the full-vocabulary KL, the rollout/scoring machinery, a smoke run and resume."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import eval as ev
import opd

ROOT = Path(__file__).resolve().parents[1]


def test_eq6_gradient_is_reverse_kl_gradient_in_expectation():
    """-sum_t ratio_t r_t on samples from pi has, in expectation, the gradient of KL(pi || teacher)."""
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(6) * 2, -1)
    p = torch.softmax(theta, -1)
    exact = torch.autograd.grad((p * (torch.log(p) - teacher)).sum(), theta)[0]
    a = torch.multinomial(p.detach(), 400_000, replacement=True)
    logp = torch.log_softmax(theta, -1)[a].unsqueeze(1)  # [N, T=1]
    loss = opd.opd_loss(logp, logp.detach(), teacher[a].unsqueeze(1), torch.ones_like(logp))
    sampled = torch.autograd.grad(loss, theta)[0]
    assert torch.allclose(sampled, exact, atol=0.02), (sampled, exact)
    assert exact.abs().max() > 0.1  # the comparison is not between two near-zero vectors


def test_opd_loss_value_sum_over_tokens_mean_over_sequences():
    logp = torch.zeros(2, 3)
    teacher = torch.tensor([[-1.0, -2.0, -5.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).float()
    # ratio 1, reward = teacher - old: sequence sums -3 and -1 -> loss = -mean(-3, -1) = 2
    assert opd.opd_loss(logp, logp, teacher, mask).item() == pytest.approx(2.0)


def test_fullkl_equals_brute_force_and_ignores_forbidden_tokens():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    s[..., 3], t[..., 3] = float("-inf"), float("-inf")  # a forbidden token in both supports
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).float()
    brute = 0.0
    for b in range(2):
        for i in range(5):
            ps, pt = torch.softmax(s[b, i], -1), torch.softmax(t[b, i], -1)
            keep = ps > 0
            brute += mask[b, i] * (ps[keep] * (ps[keep].log() - pt[keep].log())).sum()
    for chunk in (1, 2, 16):
        assert opd.fullkl_loss(s, t, mask, chunk).item() == pytest.approx(brute.item() / 2, rel=1e-5)


def test_fullkl_keeps_one_chunk_at_a_time_for_backward():
    """What autograd stores for fullkl_loss beyond its inputs: before the per-chunk checkpoint, every chunk's fp32
    softmaxes (3.25x [B, T, V] fp32, whatever the chunk); now nothing of size [B, T, V]."""
    B, T, V = 2, 64, 4000
    logits, teacher = torch.randn(B, T, V, requires_grad=True), torch.randn(B, T, V)
    inputs = {logits.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    stored = {}

    def pack(t):  # every tensor autograd saves for backward, counted once per storage, the inputs' own excluded
        if t.untyped_storage().data_ptr() not in inputs:
            stored[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    for chunk in (4, 16, 64):
        stored.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = opd.fullkl_loss(logits, teacher, torch.ones(B, T), chunk)
        assert sum(stored.values()) < 0.01 * B * T * V * 4, (chunk, sum(stored.values()) / (B * T * V * 4))
        loss.backward()  # and the recomputing backward still works
    assert torch.isfinite(logits.grad).all()


def test_fullkl_gradient_is_finite_with_forbidden_tokens():
    s = torch.randn(1, 3, 5, requires_grad=True)
    t = torch.randn(1, 3, 5)
    blocked = torch.tensor([False, True, False, False, False])
    opd.fullkl_loss(s.masked_fill(blocked, float("-inf")), t.masked_fill(blocked, float("-inf")),
                    torch.ones(1, 3)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert (s.grad[..., 1] == 0).all()


def test_completion_logits_slices_padded_teacher_vocab_and_blocks_forbidden():
    """A teacher with a padded embedding (vocab 10 vs the student's 7) is scored over the student's 7."""
    logits = torch.randn(2, 6, 10)
    fake = lambda **kw: SimpleNamespace(logits=logits[:, -kw["logits_to_keep"]:])
    out = opd.completion_logits(fake, {}, T=3, temperature=2.0, forbidden=[1, 4], vocab=7)
    assert out.shape == (2, 3, 7)
    assert torch.isinf(out[..., [1, 4]]).all()
    # position t's logits predict completion token t: the T+1 kept positions drop the last one
    assert torch.allclose(out[..., 0], logits[:, 2:5, 0] / 2.0)


def test_completion_mask_keeps_eos_when_pad_equals_eos():
    eos = 9
    ids = torch.tensor([[4, 5, eos, eos, eos], [4, eos, 6, 7, eos], [1, 2, 3, 4, 5]])
    assert ev.completion_mask(ids, [eos]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def student(tiny):
    model, processor = ev.load_model(tiny["student"])
    samples = data.load_annotations(tiny["test"])[:2]
    videos, _ = ev.load_videos(samples)
    return model, processor, samples, data.encode(processor, samples, videos)


def test_expand_keeps_video_features_aligned(student):
    """Each repeated prompt must see its own video: logits of the expanded batch equal the originals."""
    model, processor, samples, batch = student
    with torch.no_grad():
        base = model(**batch).logits
        big = model(**opd.expand(batch, 3)).logits
    assert big.shape[0] == 6
    for i in range(2):
        for k in range(3):
            assert torch.allclose(big[3 * i + k], base[i], atol=1e-5)
    # and the two videos really differ in what the model sees
    assert not torch.allclose(base[0, -1], base[1, -1], atol=1e-4)


def test_sampling_and_scoring_use_the_same_temperature(student):
    """First-token frequencies of eval.generate at T=3 follow softmax(completion_logits at T=3)."""
    model, processor, samples, batch = student
    one = opd.expand(_one_prompt(batch, 0), 1)
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked distribution, so temperatures are told apart
        try:
            n, temperature = 3000, 3.0
            ids, mask = ev.generate(model, processor, opd.expand(one, n), max_new_tokens=1, temperature=temperature)
            seq = opd.append_completion(one, ids[:1], mask[:1])
            lp = torch.log_softmax(opd.completion_logits(model, seq, 1, temperature, ev.forbidden_ids(processor)), -1)
            lp1 = torch.log_softmax(opd.completion_logits(model, seq, 1, 1.0, ev.forbidden_ids(processor)), -1)
        finally:
            model.lm_head.weight.div_(20)
    freq = torch.bincount(ids[:, 0], minlength=lp.shape[-1]).float() / n
    top = lp[0, 0].topk(3).indices
    assert torch.allclose(freq[top], lp[0, 0, top].exp(), atol=0.04), (freq[top], lp[0, 0, top].exp())
    assert (lp[0, 0, top].exp() - lp1[0, 0, top].exp()).abs().max() > 0.1  # T=1 would have been told apart
    assert not set(ids.flatten().tolist()) & set(ev.forbidden_ids(processor))


def _one_prompt(batch, i):
    """Prompt i of a batch (its own video patches) as a batch of one."""
    sizes = batch["video_grid_thw"].prod(-1).tolist()
    out = {k: v[i:i + 1] for k, v in batch.items() if k != "pixel_values_videos"}
    out["pixel_values_videos"] = batch["pixel_values_videos"].split(sizes)[i]
    return opd.BatchFeature(out)


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

    args = opd.Args(out=str(tmp_path), steps=7)
    evals = opd.train_in_stages(args, ["a", "b", "c"], run)
    assert [(i, n) for i, n, _ in seen] == [(0, 2), (1, 2), (2, 3)] and seen[2][2] == f"{tmp_path}/c"
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 8))
    assert [r["wall"] for r in log if "loss" in r] == [1.5, 3.0, 4.5, 6.0, 7.5, 9.0, 10.5]
    assert [(r["step"], r["stage"]) for r in log if "eval" in r] == [(0, "a"), (2, "a"), (4, "b"), (7, "c")]
    assert [(e["step"], e["eval"]["mIoU"]) for e in evals] == [(0, 0), (2, 1), (4, 2), (7, 3)]


def _run(script, tiny, out, *extra):
    teacher = ("--teacher", tiny["teacher"]) if script == "opd.py" else ()  # grpo.py, dpo.py have no teacher
    cmd = [sys.executable, script, "--student", tiny["student"], *teacher, "--data", tiny["train"],
           "--eval-data", tiny["test"], "--out", str(out), "--prompts-per-step", "4", "--micro-batch", "2",
           "--lr", "1e-3", "--max-new-tokens", "8", "--eval-limit", "4", *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("loss", ["sampled", "fullkl"])
def test_smoke_two_steps_and_resume(tiny, tmp_path, loss):
    """2 steps in one go == 1 step, then --resume to 2 (same weights); the log has what it promises."""
    out = _run("opd.py", tiny, tmp_path / "full", "--steps", "2", "--loss", loss)
    assert "student before" in out and "teacher" in out
    log = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("kl", "rollout_iou", "tokens_per_s", "time", "grad_norm"):
        assert key in steps[0]
    assert set(steps[0]["time"]) == {"generate", "student", "teacher", "other"}
    assert steps[0]["grad_norm"] > 0  # the loss reaches the student's weights
    _run("opd.py", tiny, tmp_path / "split", "--steps", "1", "--loss", loss)
    _run("opd.py", tiny, tmp_path / "split", "--steps", "2", "--loss", loss, "--resume")
    resumed = [json.loads(x) for x in open(tmp_path / "split" / "log.jsonl")]
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2]  # one log for the whole run
    assert [r["step"] for r in resumed if "eval" in r] == [0, 1, 2]  # before, at the 1-step end, after resuming
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "split" / "final")
    start = _weights(tiny["student"])
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training changed something
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("rollouts", ["student", "teacher"])
def test_rollouts_are_sampled_by_the_model_named(tiny, tmp_path, monkeypatch, rollouts):
    """--rollouts teacher (off-policy): every training rollout is the teacher's sample; on-policy, the student's.
    Evaluations stay the student's (and the teacher's) greedy answers."""
    real, samplers = ev.generate, []

    def recording(model, processor, batch, max_new_tokens=32, temperature=None):
        if temperature is not None:  # a sampled rollout, not a greedy evaluation
            samplers.append(model.name_or_path)
        return real(model, processor, batch, max_new_tokens, temperature)
    monkeypatch.setattr(ev, "generate", recording)
    monkeypatch.setattr(sys, "argv", [
        "opd.py", "--student", tiny["student"], "--teacher", tiny["teacher"], "--data", tiny["train"], "--eval-data",
        tiny["test"], "--out", str(tmp_path / "run"), "--steps", "2", "--prompts-per-step", "4", "--micro-batch", "2",
        "--max-new-tokens", "8", "--eval-limit", "2", "--num-workers", "0", "--loss", "fullkl", "--rollouts", rollouts])
    opd.main()
    assert samplers == [tiny[rollouts]] * 4  # 2 steps x 2 micro-batches


def test_mismatched_tokenizers_are_refused():
    a = SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: {"x": 1, "y": 2}), video_token_id=5)
    b = SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: {"x": 1, "y": 3}), video_token_id=5)
    with pytest.raises(ValueError, match="disagree"):
        opd.check_tokenizers(a, b)
    c = SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: {"x": 1}), video_token_id=6)
    with pytest.raises(ValueError, match="video"):
        opd.check_tokenizers(a, c)


def test_loss_head_memory_completion_only_vs_full_logits(tmp_path):
    """Peak memory growth of one forward+backward on a ~1k-token video prompt with Qwen's 151,936-row vocab."""
    res = subprocess.run([sys.executable, "tests/bench_loss_head.py", "--prompt-tokens", "1024", "--completion", "32",
                          "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # full logits: ~1.1k x 151,936 x 4 bytes = ~0.7 GB per copy; completion-only: 33 rows
    assert out["full"] > 500 and out["ratio"] > 5, out


# ----------------------------------------------------------------------------- VA-OPD (opd.py --va)
def test_degrade_is_blocky_same_shape_and_matches_manual():
    """scale 0.5 on 4 x 4: bilinear (no anti-aliasing) samples each 2 x 2 block's centre = its mean; nearest back."""
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 64, (2, 4, 4, 3)) * 4).astype(np.uint8)  # block means are whole numbers
    out = opd.degrade(frames, 0.5)
    means = frames.reshape(2, 2, 2, 2, 2, 3).astype(float).mean((2, 4))  # [N, 2, 2, 3]
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert np.array_equal(out, means.repeat(2, 1).repeat(2, 2).astype(np.uint8))
    # the miniature's 32 x 32 frames at 10%: 3 x 3 blocks of 11, 10, 11 pixels (nearest-exact), one colour each
    big = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    low = opd.degrade(big, 0.1)
    assert low.shape == big.shape and not np.array_equal(low, big)
    for rows in (slice(0, 11), slice(11, 21), slice(21, 32)):
        for cols in (slice(0, 11), slice(11, 21), slice(21, 32)):
            block = low[:, rows, cols]
            assert (block == block[:, :1, :1]).all()


def test_degraded_video_keeps_token_layout_and_changes_teacher(teacher, tiny_test):
    """Same input_ids (the processor makes the same patches), other pixels, other teacher log-probs."""
    model, processor = teacher
    samples, videos = tiny_test
    clean = data.encode(processor, samples[:2], videos[:2])
    low = data.encode(processor, samples[:2], [(opd.degrade(f), m) for f, m in videos[:2]])
    assert torch.equal(clean["input_ids"], low["input_ids"])
    assert not torch.allclose(clean["pixel_values_videos"], low["pixel_values_videos"])
    ids = processor.tokenizer(["The event happens in 1.0 - 3.0"] * 2, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    forbidden = ev.forbidden_ids(processor)
    with torch.no_grad():
        a, b = (opd.token_logp(opd.completion_logits(model, opd.append_completion(p, ids, mask), ids.shape[1], 1.0,
                                                     forbidden), ids) for p in (clean, low))
    assert (a - b).abs().max() > 1e-5  # the reduced teacher barely looks at detail: 2e-4 measured


def test_visual_advantage_is_clamped_masked_and_detached():
    clean = torch.tensor([[-0.5, -2.0, -1.0], [-0.1, -0.2, -3.0]], requires_grad=True)
    degraded = torch.tensor([[-1.5, -1.0, -1.0], [-2.1, -0.2, -4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    va = opd.visual_advantage(clean, degraded, mask)
    assert torch.allclose(va, torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    assert not va.requires_grad


def test_va_weights_are_softmax_of_group_z_scores():
    # prompt 0: mean VA 1, 2, 3 (row 0's padded 9 is not counted); prompt 1: all equal
    va = torch.tensor([[1.0, 1.0, 9.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0],
                       [0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    w = opd.va_weights(va, mask, group=3)
    z = 1 / (math.sqrt(2 / 3) + 1e-6)  # (3 - 2) / population std of (1, 2, 3)
    e = [math.exp(-z), 1.0, math.exp(z)]
    assert torch.allclose(w[:3], torch.tensor([x / sum(e) for x in e]), atol=1e-6)
    assert torch.allclose(w[3:], torch.full((3,), 1 / 3))
    assert torch.allclose(w.view(2, 3).sum(1), torch.ones(2))
    assert torch.allclose(opd.va_weights(va, mask, group=1), torch.ones(6))  # one rollout per prompt: weight 1


def test_va_split_takes_top_ceil_fraction_of_each_rollouts_real_tokens():
    va = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2, 7.0],    # T 5: ceil(1.0) = 1; the padded 7.0 is not a token
                       [0.1, 0.5, 0.3, 0.9, 0.2, 0.4],    # T 6: ceil(1.2) = 2
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],    # T 1: ceil(0.2) = 1, the low group is empty
                       [0.3, 0.2, 0.1, 0.0, 0.0, 0.0]])   # T 0: nothing
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6])
    high = opd.va_split(va, mask, 0.2)
    assert high.int().tolist() == [[0, 0, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0], [0] * 6]
    assert opd.va_split(va, mask, 0.5).sum(1).tolist() == [3, 3, 1, 0]


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
        loss = opd.va_opd_loss(s, t, va, mask, K, 0.2, chunk)
        assert loss.item() == pytest.approx(total / 2, rel=1e-5)
    x = s.clone().requires_grad_(True)
    opd.va_opd_loss(x, t, va, mask, K).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[..., 1] == 0).all()
    assert (x.grad[1, 3:] == 0).all() and x.grad[1, :3].abs().sum() > 0  # padded positions get no gradient


def test_smoke_va_two_steps(tiny, tmp_path):
    out = _run("opd.py", tiny, tmp_path, "--steps", "2", "--va", "--rollouts-per-prompt", "2", "--temperature", "0.7")
    assert "student after" in out
    steps = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["grad_norm"] > 0 and steps[0]["loss"] > 0
    a, start = _weights(tmp_path / "final"), _weights(tiny["student"])
    assert any(not torch.equal(a[k], start[k]) for k in a)
