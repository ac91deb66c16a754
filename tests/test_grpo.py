"""grpo.py: advantages, clipping, the IoU reward on tricky answers, a smoke run and resume."""
import json
import math

import pytest
import torch

import data
import eval as ev
import grpo
from test_opd import _run, _weights


def test_one_rollout_a_group_scaled_is_zero_not_nan():
    """--group-size 1 --scale-rewards: the std of one reward is NaN; the advantage is 0, as unscaled."""
    adv = grpo.group_advantages(torch.tensor([0.7, 0.2]), 1, scale=True)
    assert torch.equal(adv, torch.zeros(2))


def test_group_advantages_zero_mean_per_group():
    r = torch.tensor([0.0, 0.5, 1.0, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv = grpo.group_advantages(r, 4)
    assert torch.allclose(adv.view(2, 4).mean(1), torch.zeros(2), atol=1e-7)
    assert torch.allclose(adv[:4], torch.tensor([-0.5, 0.0, 0.5, 0.0]))
    assert (adv[4:] == 0).all()  # all-equal rewards: no signal
    scaled = grpo.group_advantages(r, 4, scale=True)
    assert scaled[:4].std().item() == pytest.approx(1.0, rel=1e-3)
    assert (scaled[4:] == 0).all()


def test_equal_rewards_give_zero_gradient():
    logits = torch.randn(4, 3, 5, requires_grad=True)
    ids = torch.randint(0, 5, (4, 3))
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    adv = grpo.group_advantages(torch.full((4,), 0.7), 4)
    grpo.grpo_loss(logp, logp.detach(), adv, torch.ones(4, 3)).backward()
    assert logits.grad.abs().max() == 0


def test_clipping_on_crafted_ratios():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5, 3.0]])).requires_grad_()
    mask = torch.ones(1, 4)
    # positive advantage: ratios above 1.2 are clipped (no gradient), below are not
    grpo.grpo_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2).backward()
    assert logp.grad[0, 0] < 0 and logp.grad[0, 1] < 0
    assert logp.grad[0, 2] == 0 and logp.grad[0, 3] == 0
    logp.grad = None
    # negative advantage: ratios below 0.8 are clipped, above are not (the pessimistic bound)
    grpo.grpo_loss(logp, old, torch.tensor([-1.0]), mask, clip_eps=0.2).backward()
    assert logp.grad[0, 0] == 0
    assert logp.grad[0, 2] > 0 and logp.grad[0, 3] > 0
    # the loss value: token-level mean of -min(r A, clip(r) A)
    value = grpo.grpo_loss(logp.detach(), old, torch.tensor([1.0]), mask, clip_eps=0.2)
    assert value.item() == pytest.approx(-(0.5 + 1.0 + 1.2 + 1.2) / 4)


def test_k3_kl_is_zero_at_the_reference_and_positive_away():
    """k3 = r - log r - 1, r = pi_ref / pi_theta, times beta, averaged over tokens: 0 at the reference, its value
    on either side of it (k3 is not symmetric in log r)."""
    logp = torch.log(torch.tensor([[0.3, 0.6]]))
    mask, adv = torch.ones(1, 2), torch.zeros(1)
    assert grpo.grpo_loss(logp, logp, adv, mask, ref_logp=logp, beta=0.1).item() == pytest.approx(0.0, abs=1e-7)
    for shift in (-0.5, 0.5):  # every token's log r is the shift
        k3 = math.exp(shift) - shift - 1
        value = grpo.grpo_loss(logp, logp, adv, mask, ref_logp=logp + shift, beta=0.1).item()
        assert value == pytest.approx(0.1 * k3, rel=1e-5)


@pytest.mark.parametrize("answer, reward", [
    ("The event happens in 2.0 - 4.0 seconds", 1.0),
    ("The event happens in 3.0 - 4.0 seconds", 0.5),
    ("The event happens in 4.0 - 2.0 seconds", 0.0),   # inverted
    ("The event happens in 2.0 - 2.0 seconds", 0.0),   # empty
    ("I cannot tell", 0.0),                            # unparsable: no format reward either
    ("The event happens in 0:02 - 0:04 seconds", 1.0),  # mm:ss
    ("From 2 to 4 seconds, or 6 - 8", 1.0),            # the first span counts
    ("The event happens in 5.0 - 9.0 seconds", 0.0),   # disjoint
])
def test_iou_reward_on_tricky_answers(answer, reward):
    assert ev.iou(data.parse_span(answer), (2.0, 4.0)) == pytest.approx(reward)


def test_smoke_two_steps_and_resume(tiny, tmp_path):
    common = ("--prompts-per-step", "2", "--micro-batch", "1", "--group-size", "4", "--ppo-epochs", "2",
              "--max-new-tokens", "16", "--temperature", "0.3")  # whole answers near greedy: some earn a reward
    out = _run("grpo.py", tiny, tmp_path / "full", "--steps", "2", *common)
    assert "student after" in out
    log = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    _run("grpo.py", tiny, tmp_path / "split", "--steps", "1", *common)
    _run("grpo.py", tiny, tmp_path / "split", "--steps", "2", "--resume", *common)
    assert any(r["rollout_iou"] > 0 for r in log if "loss" in r)  # some rewards, so advantages are not all 0
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "split" / "final")
    start = _weights(tiny["student"])
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the update moved the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
