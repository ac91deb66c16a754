"""neighbours/tempo.py (TEMPO): the DPO loss on crafted numbers, the perturbations, identical-pair masking, a
smoke run."""
import json
import math

import numpy as np
import pytest
import torch

import data
from neighbours import tempo
import rollout
from test_opd import _run, _weights


# ----------------------------------------------------------------------------- dpo_loss
def test_equal_margins_give_log_2():
    logp_c, logp_r = torch.tensor([-3.0, -1.0]), torch.tensor([-5.0, -2.0])
    # policy and reference identical (the first step): every margin is 0
    assert tempo.dpo_loss(logp_c, logp_r, logp_c, logp_r).item() == pytest.approx(math.log(2))
    # chosen and rejected moved by the same amount from the reference: still margin 0
    assert tempo.dpo_loss(logp_c + 0.7, logp_r + 0.7, logp_c, logp_r).item() == pytest.approx(math.log(2))


def test_value_and_gradient_by_hand():
    logp_c = torch.tensor([-1.0, -2.0], requires_grad=True)
    logp_r = torch.tensor([-3.0, -1.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0])
    # margins: (0 - (-2)) = 2 and (-1 - 0) = -1; beta 0.1
    loss = tempo.dpo_loss(logp_c, logp_r, ref_c, ref_r, beta=0.1)
    expected = (math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(0.1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))
    # dL/dlogp_c = -beta * sigmoid(-beta * m) / B; dL/dlogp_r is its negative
    g = [-0.1 * sig(-0.2) / 2, -0.1 * sig(0.1) / 2]
    assert logp_c.grad.tolist() == pytest.approx(g, rel=1e-5)
    assert logp_r.grad.tolist() == pytest.approx([-x for x in g], rel=1e-5)
    assert (logp_c.grad < 0).all() and (logp_r.grad > 0).all()  # descent raises chosen, lowers rejected


def test_beta_scales_the_gradient_at_zero_margin():
    for beta in (0.1, 0.5):
        logp_c = torch.tensor([-2.0], requires_grad=True)
        logp_r = torch.tensor([-2.0], requires_grad=True)
        tempo.dpo_loss(logp_c, logp_r, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=beta).backward()
        assert logp_c.grad.item() == pytest.approx(-beta / 2)  # -beta * sigmoid(0)
        assert logp_r.grad.item() == pytest.approx(beta / 2)


def test_reference_gets_no_gradient():
    ref_c = torch.tensor([-1.0], requires_grad=True)
    tempo.dpo_loss(torch.tensor([-2.0], requires_grad=True), torch.tensor([-3.0]), ref_c, torch.tensor([-1.0]))
    assert ref_c.grad is None


def test_masked_pairs_drop_out_of_value_and_gradient():
    logp_c = torch.tensor([-1.0, -2.0, -4.0], requires_grad=True)
    logp_r = torch.tensor([-3.0, -1.0, -4.0], requires_grad=True)
    ref = torch.full((3,), -1.0)
    keep = torch.tensor([True, True, False])
    loss = tempo.dpo_loss(logp_c, logp_r, ref, ref, 0.1, keep)
    assert loss.item() == pytest.approx(tempo.dpo_loss(logp_c[:2], logp_r[:2], ref[:2], ref[:2], 0.1).item())
    loss.backward()
    assert logp_c.grad[2] == 0 and logp_r.grad[2] == 0
    none = tempo.dpo_loss(logp_c, logp_r, ref, ref, 0.1, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0 and none.requires_grad  # nothing kept: a zero loss that still backpropagates


def test_identical_answers_are_detected():
    pad = 0
    ids_a = torch.tensor([[5, 6, 7, pad], [5, 6, 7, 8], [5, 6, pad, pad]])
    mask_a = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    ids_b = torch.tensor([[5, 6, 7], [5, 6, 9], [5, 6, 7]])  # shorter tensor: lengths may differ
    mask_b = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    # row 0 same tokens; row 1 differs in a token and in length; row 2 is a strict prefix of the other answer
    assert tempo.same_answer(ids_a, mask_a, ids_b, mask_b).tolist() == [True, False, False]


def test_prompt_of_undoes_append_completion():
    """The rejected answer is scored under the clean prompt: prompt_of must give back exactly that prompt."""
    prompt = tempo.BatchFeature({"input_ids": torch.tensor([[0, 3, 4], [5, 6, 7]]),
                                   "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
                                   "mm_token_type_ids": torch.tensor([[0, 2, 0], [2, 2, 0]]),
                                   "pixel_values_videos": torch.randn(6, 4),
                                   "video_grid_thw": torch.tensor([[1, 1, 3]] * 2)})
    seq = rollout.append_completion(prompt, torch.tensor([[8, 9], [8, 0]]), torch.tensor([[1, 1], [1, 0]]))
    back = tempo.prompt_of(seq, 2)
    assert set(back) == set(prompt)
    for k in prompt:
        assert torch.equal(back[k], prompt[k]), k


# ----------------------------------------------------------------------------- perturbations
def _frames(n=16):
    """n frames [n, 2, 2, 3] whose pixels all hold the frame's index: the output tells which frame went where."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 3)).copy()


def _sources(out):
    return out[:, 0, 0, 0].tolist()


def _breaks(order):
    """How many neighbours in the output are not consecutive frames of the input."""
    return sum(b != a + 1 for a, b in zip(order, order[1:]))


@pytest.mark.parametrize("kind", ["shuffle", "reverse"])
def test_reorderings_keep_shape_and_frames(kind):
    rng = np.random.default_rng(0)
    for n in (16, 10, 4):
        for r in (16, 8, 4, 2):
            out = tempo.perturb(_frames(n), r, kind, rng)
            assert out.shape == (n, 2, 2, 3) and out.dtype == np.uint8
            assert sorted(_sources(out)) == list(range(n))       # the same multiset of frames
            assert _sources(out) != list(range(n))               # but not in the original order


def test_strength_sets_the_group_size():
    rng = np.random.default_rng(1)
    # reverse: r 16 on 16 frames reverses every frame; r 2 swaps the two halves, each in its own order
    assert _sources(tempo.perturb(_frames(), 16, "reverse", rng)) == list(range(15, -1, -1))
    assert _sources(tempo.perturb(_frames(), 2, "reverse", rng)) == list(range(8, 16)) + list(range(8))
    assert _sources(tempo.perturb(_frames(), 4, "reverse", rng)) == [12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]
    # shuffle r 2: two groups of 8, and never the unchanged order, so always the swapped halves
    for _ in range(10):
        assert _sources(tempo.perturb(_frames(), 2, "shuffle", rng)) == list(range(8, 16)) + list(range(8))
    # shuffle: groups of n // r consecutive frames stay whole, so r 16 breaks the timeline far more than r 2
    strong = [_breaks(_sources(tempo.perturb(_frames(), 16, "shuffle", rng))) for _ in range(20)]
    for r, g in ((8, 2), (4, 4)):
        out = _sources(tempo.perturb(_frames(), r, "shuffle", rng))
        assert all(out[i:i + g] == list(range(out[i], out[i] + g)) for i in range(0, 16, g))
        assert out[0] % g == 0
    assert min(strong) > 1 and np.mean(strong) > 8
    # a clip shorter than r: one frame per group (clamped), still a real shuffle
    assert sorted(_sources(tempo.perturb(_frames(6), 16, "shuffle", rng))) == list(range(6))


@pytest.mark.parametrize("r, kept", [(16, 1), (8, 2), (4, 4), (2, 8)])
def test_drop_keeps_n_over_r_frames_and_the_count(r, kept):
    rng = np.random.default_rng(2)
    for _ in range(20):
        src = _sources(tempo.perturb(_frames(), r, "drop", rng))
        assert len(src) == 16                                    # the count stays (repeats fill the gaps)
        assert len(set(src)) == kept                              # n // r frames survive
        assert src == sorted(src)                                 # time still runs forward
        # each position shows the last kept frame at or before it (the first kept one before any was kept)
        kept_frames = sorted(set(src))
        assert src == [max([k for k in kept_frames if k <= i], default=kept_frames[0]) for i in range(16)]


def test_mix_uses_all_three_kinds():
    rng = np.random.default_rng(3)
    reversed_groups = [12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]  # reverse at r 4 (a shuffle rarely)
    seen = []
    for _ in range(60):
        src = _sources(tempo.perturb(_frames(), 4, "mix", rng))
        seen.append("drop" if len(set(src)) < 16 else "reverse" if src == reversed_groups else "shuffle")
    assert all(seen.count(kind) >= 10 for kind in ("drop", "shuffle", "reverse")), seen  # ~20 each
    with pytest.raises(ValueError, match="unknown perturbation"):
        tempo.perturb(_frames(), 4, "blur", rng)


# ----------------------------------------------------------------------------- smoke run
def test_smoke_two_stages_weights_move(tiny, tmp_path):
    """2 steps, one per stage (r 16 then 2): one joined log, pair stats, first-step loss log 2, weights move."""
    out = _run("neighbours.tempo", tiny, tmp_path, "--steps", "2", "--strengths", "16,2", "--micro-batch", "4",
               "--min-changes", "2")
    assert "student before" in out and "temporally rich:" in out
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    assert [(r["step"], r["stage"]) for r in steps] == [(1, "r16"), (2, "r2")]
    assert [r["step"] for r in log if "eval" in r] == [0, 1, 2]   # before, end of stage 1, end of stage 2
    for r in steps:
        assert r["identical"] in (0, 0.25, 0.5, 0.75, 1) and 0 <= r["rejected_iou"] <= 1  # 4 pairs a step
        assert r["rejected_worse"] in (0, 0.25, 0.5, 0.75, 1)
    # step 1: policy == reference, so every kept pair has margin 0 and the loss is log 2 (0 if none is kept)
    assert steps[0]["loss"] == pytest.approx(math.log(2) if steps[0]["identical"] < 1 else 0.0, abs=1e-4)
    assert steps[1]["wall"] > steps[0]["wall"]                   # wall time runs on across stages
    trained, start = _weights(tmp_path / "final"), _weights(tiny["student"])
    assert any(not torch.equal(trained[k], start[k]) for k in trained)


def test_scene_changes_count_the_event_boundaries_inside_the_clip(tiny):
    """A miniature clip changes where its shape appears and where it goes, unless that is the clip's edge; the
    background's brightening each second is not a change."""
    samples = data.load_annotations(tiny["train"])
    counts = [tempo.scene_changes(data.load_video(s.video)[0]) for s in samples]
    assert counts == [(s.span[0] > 0) + (s.span[1] < s.duration) for s in samples]
    rich = tempo.temporally_rich(samples, 2)
    assert rich == [s for s, n in zip(samples, counts) if n >= 2] and 0 < len(rich) < len(samples)


def test_pre_sft_pauses_and_resumes_the_students_sft_exactly(tiny, tmp_path):
    """--pre-sft: half the student's SFT, DPO, the rest of the SFT. With DPO's lr ~0 the result is the miniature
    student itself: the SFT is rebuilt with its own seed, data and schedule, and resumes where it paused."""
    out = _run("neighbours.tempo", tiny, tmp_path, "--pre-sft", "--steps", "2", "--strengths", "16", "--micro-batch", "4",
               "--min-changes", "0", "--lr", "1e-12")
    rows = json.load(open(tmp_path / "summary.json"))
    assert list(rows) == ["SFT only", "half SFT", "half SFT + DPO", "half SFT + DPO + rest of SFT"]
    assert "SFT only" in out
    # miniature.build rounds its metrics to 0.1
    assert rows["half SFT + DPO + rest of SFT"]["mIoU"] == pytest.approx(rows["SFT only"]["mIoU"], abs=0.05)
    final, student, half = (_weights(p) for p in (tmp_path / "final", tiny["student"], tmp_path / "halfway"))
    diff = max((final[k] - student[k]).abs().max().item() for k in student)
    # the yardstick: how far the second half of the SFT moves the weights. The float noise of two DPO steps at lr 1e-12,
    # grown over the rest of this chaotic SFT, depends on the CPU: 2.0e-5 on one machine, 4.3e-4 of 0.109 on another
    moved = max((half[k] - student[k]).abs().max().item() for k in student)
    assert diff < 0.01 * moved, (diff, moved)
    assert any(not torch.allclose(half[k], student[k], atol=1e-3) for k in student)  # halfway is another model
