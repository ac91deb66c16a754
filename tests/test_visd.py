"""neighbours/visd.py: the per-token advantages, the EMA teacher, the privileged prompt, a smoke run against
plain GRPO."""
import copy
import json

import pytest
import torch

import data
import grpo
import rollout
from neighbours import visd
from test_opd import _run, _weights


def test_visd_advantages_on_crafted_tensors():
    adv = torch.tensor([0.5, -0.5, 0.0])
    old = torch.zeros(3, 4)
    # teacher - student log-ratios d_t: 0 (agree), log 1.2 (inside the clip), +-2 (outside it)
    d = torch.log(torch.tensor([1.0, 1.2, 1 / 1.2, 1.0]))
    teacher = torch.stack([d, d, d])
    teacher[:, 3] = 2.0
    teacher[2, 0] = float("-inf")  # a padded position the teacher finds impossible: must not give nan at A = 0
    out = visd.visd_advantages(adv, teacher, old, clip=0.5)
    assert out.shape == (3, 4)
    # A > 0: weight exp(d) -> 1, 1.2, 1/1.2, clip(e^2) = 1.5
    assert torch.allclose(out[0], 0.5 * torch.tensor([1.0, 1.2, 1 / 1.2, 1.5]))
    # A < 0: weight exp(-d) -> 1, 1/1.2, 1.2, clip(e^-2) = 0.5: more blame where the teacher likes the token less
    assert torch.allclose(out[1], -0.5 * torch.tensor([1.0, 1 / 1.2, 1.2, 0.5]))
    assert (out[2] == 0).all()  # zero advantage -> zero everywhere
    # the sign always follows A_i, the magnitude stays inside [1 - c, 1 + c] |A_i|
    torch.manual_seed(0)
    adv, teacher, old = torch.randn(64), torch.randn(64, 8) * 3, torch.randn(64, 8) * 3
    out = visd.visd_advantages(adv, teacher, old, clip=0.3)
    assert (torch.sign(out) == torch.sign(adv).unsqueeze(1)).all()
    ratio = out / adv.unsqueeze(1)
    assert ratio.min() >= 0.7 - 1e-6 and ratio.max() <= 1.3 + 1e-6
    assert ratio.min() < 0.71 and ratio.max() > 1.29  # the crafted spread reaches both clip bounds


def test_visd_advantages_are_constants_and_reduce_to_grpo_when_teacher_agrees():
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.4]])).requires_grad_()
    teacher = torch.log(torch.tensor([[0.4, 0.5, 0.1]]))
    mask = torch.ones(1, 3)
    same = visd.visd_advantages(torch.tensor([0.7]), logp, logp, clip=0.5)
    assert torch.allclose(same, torch.full((1, 3), 0.7))
    tok = visd.visd_advantages(torch.tensor([1.0]), teacher, logp, clip=0.5)  # weights 2 -> 1.5, 1, 0.25 -> 0.5
    assert torch.allclose(tok, torch.tensor([[1.5, 1.0, 0.5]]))
    grpo.grpo_loss(logp, logp.detach(), tok, mask).backward()
    # ratio 1, no clipping: d loss / d logp_t = -A_{i,t} / (number of tokens); no gradient through the weights
    assert torch.allclose(logp.grad, -torch.tensor([[1.5, 1.0, 0.5]]) / 3)


def test_ema_update_is_exact():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        teacher.weight.fill_(0.5)
        teacher.bias.fill_(-1.0)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    visd.ema_update(teacher, student, 0.75)
    s = student.state_dict()
    for k in t0:
        assert torch.allclose(teacher.state_dict()[k], 0.75 * t0[k] + 0.25 * s[k], atol=1e-7, rtol=0), k
        assert not torch.equal(teacher.state_dict()[k], t0[k])


def test_lambda_mixes_the_teacher_weight_with_grpo_and_the_schedule_hands_over():
    adv, old = torch.tensor([1.0]), torch.zeros(1, 2)
    teacher = torch.log(torch.tensor([[2.0, 0.5]]))  # weights clip(2) = 1.2 and 0.8 at c 0.2
    assert torch.allclose(visd.visd_advantages(adv, teacher, old, 0.2, lam=0.5), torch.tensor([[1.1, 0.9]]))
    assert torch.allclose(visd.visd_advantages(adv, teacher, old, 0.2, lam=0.0), torch.ones(1, 2))  # GRPO
    args = visd.VISDArgs(visd_lambda=0.5, visd_anneal_steps=100)
    assert [visd.share(args, s) for s in (0, 50, 100, 150)] == [0.5, 0.25, 0.0, 0.0]


@pytest.mark.parametrize("answer, words", [
    ("The event happens in 2.0 - 5.0 seconds", ["IoU 1.00", "start correct, it is 2.0", "end correct, it is 5.0"]),
    ("The event happens in 1.0 - 5.5 seconds", ["start 1.0 s too early, it is 2.0", "end 0.5 s too late, it is 5.0"]),
    ("The event happens in 6.0 - 3.0 seconds", ["IoU 0.00", "start not before end", "start 4.0 s too late"]),
    ("The event happens in 7.0 - 9.0 seconds", ["outside the video", "IoU 0.00"]),
    ("no idea", ["no span", "the event is 2.0 - 5.0 seconds"]),
])
def test_judge_names_each_dimension(answer, words):
    """Correctness (IoU), consistency (a span, ordered, inside the video), grounding (each boundary's error)."""
    truth = data.Sample("v.mp4", "the red circle", (2.0, 5.0), 8.0, "v#0")
    verdict = visd.ev.judge(answer, truth)
    for w in words:
        assert w in verdict["feedback"], verdict["feedback"]
    assert verdict["consistent"] == (answer.startswith("The event happens in 2.0") or "1.0 - 5.5" in answer)


def test_feedback_reaches_each_rollouts_own_prompt(tiny_processor, tiny_test):
    """reprompt with feedback: rollout k of a prompt is scored behind its own verdict, its tokens unchanged."""
    samples, videos = tiny_test
    ids = torch.tensor([[5, 6, 7], [8, 9, 0], [5, 5, 5], [6, 6, 6]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    notes = ["Judge: start correct.", "Judge: IoU 0.00.", "Judge: end correct.", "Judge: IoU 1.00."]
    seq = rollout.reprompt(tiny_processor, samples[:2], videos[:2], ids, mask, feedback=notes)
    texts = tiny_processor.tokenizer.batch_decode(seq["input_ids"][:, :-3])
    assert all(n in t for n, t in zip(notes, texts)) and samples[1].query in texts[3]
    assert torch.equal(seq["input_ids"][:, -3:], ids) and torch.equal(seq["attention_mask"][:, -3:], mask)


def test_visd_smoke_two_steps(tiny, tmp_path):
    common = ("--steps", "2", "--prompts-per-step", "2", "--micro-batch", "1", "--group-size", "4",
              "--max-new-tokens", "16", "--temperature", "0.3")
    out = _run("neighbours.visd", tiny, tmp_path, "--visd-decay", "0.5", "--visd-lambda", "1", "--visd-anneal-steps", "2",
               *common)
    assert "student after" in out
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["time"]["teacher"] > 0 for r in steps)  # the privileged teacher forward ran
    assert any(r["kl"] != 0 for r in steps)  # the judged teacher scores the tokens differently from the student
    assert [r["lambda"] for r in steps] == [1.0, 0.5]  # the schedule, one step at a time
    a, start = _weights(tmp_path / "final"), _weights(tiny["student"])
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the update moved the weights
    # plain GRPO from the same seed: the same first rollouts, then only the token weights differ
    _run("grpo.py", tiny, tmp_path / "grpo", *common)
    plain = [json.loads(x) for x in open(tmp_path / "grpo" / "log.jsonl") if '"loss"' in x]
    assert plain[0]["rollout_iou"] == steps[0]["rollout_iou"]
    g = _weights(tmp_path / "grpo" / "final")
    assert any(not torch.allclose(a[k], g[k], atol=1e-6) for k in a)  # the teacher's weights changed the update
