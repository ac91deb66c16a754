"""VISD: structured self-distillation on GRPO (Lin et al. 2026, arXiv 2605.06094; code Koreyoshi01/VISD).

    python -m neighbours.visd                                # the miniature student, GRPO's budget
    python -m neighbours.visd --student Qwen/Qwen3-VL-8B-Instruct --data train.json --eval-data test.json

GRPO's group advantage A_i still decides the direction of each rollout's update; a teacher decides how the credit
is spread over its tokens. The teacher is an EMA copy of the policy that reads privileged information: a judge's
structured feedback on that very rollout (eval.judge: answer correctness, logical consistency, temporal
grounding, e.g. "start 2.0 s too early, it is 4.0"), then scores the rollout's own tokens. Tokens it likes more than
the student get more of a positive A_i; tokens it likes less get more of a negative one (`visd_advantages`). A
schedule hands over from distillation to plain GRPO: the teacher's share lambda falls linearly to 0 over
--visd-anneal-steps, after which the teacher and the judge are no longer run.

Where each choice comes from (paper = the abstract, the only text we could read; code = the official release):
- judge dimensions (correctness, consistency, grounding), feedback as privileged information for the teacher,
  direction from A_i and magnitude from the teacher, curriculum scheduling, EMA teacher: paper.
- the feedback block at the end of the user turn, right before the answer (data.prompt_messages): code.
- w_t = clip(exp(sign(A_i) (log pi_T - log pi_old)), 1 - c, 1 + c), c 0.2; A_it = A_i ((1 - lambda) + lambda w_t),
  lambda 0.5 annealed linearly to 0 over 600 steps, teacher off after that; EMA rate 0.01 per step (decay 0.99):
  code (run_visd.sh, phase2_reweighting.py).
- ours: the judge is a rule, not an LLM (a grounding answer can be checked exactly); its feedback names where a
  wrong boundary really is (like the code's "verified temporal window"); the log-ratio is the sampled token's over
  the whole vocabulary (the code renormalises over the teacher's top 16); on the miniature the anneal takes 150 of
  the 200 steps, so the last quarter is plain GRPO as in the code.
"""
from dataclasses import dataclass

import torch

import data
import eval as ev
import grpo
import opd
import rollout
from lib import cli, fsdp, run


@dataclass
class VISDArgs(grpo.GRPOArgs):
    out: str = "runs/visd"          # run folder
    visd_decay: float = 0.99        # EMA decay of the teacher per optimizer step (code: rate 0.01)
    visd_clip: float = 0.2          # token weights w_t clipped to [1 - c, 1 + c] (code: 0.2)
    visd_lambda: float = 0.5        # the teacher's share of the token weight at the start (code: 0.5)
    visd_anneal_steps: int = 600    # lambda falls linearly to 0 over these steps, then plain GRPO (code: 600)


MINIATURE = grpo.MINIATURE | dict(visd_anneal_steps=150)
BOUNDS = dict(beta=(0, True), visd_decay=(0, True), visd_clip=(0, False), visd_lambda=(0, True),
              visd_anneal_steps=(1, True))


def visd_advantages(advantages, teacher_logp, old_logp, clip, lam=1.0):
    """VISD's per-token advantages: advantages [B] (GRPO's A_i); teacher_logp, old_logp [B, T] -> [B, T].

        d_t = log pi_teacher(a_t | x, feedback) - log pi_old(a_t | x)             (detached)
        w_t = clip(exp(sign(A_i) * d_t), 1 - c, 1 + c)
        A_{i,t} = A_i * ((1 - lambda) + lambda * w_t)
    The sign is A_i's (w_t > 0): the group's outcome decides the direction, the teacher only redistributes credit
    within the sequence. For A_i > 0, tokens the judged teacher likes more than the student get up to 1 + c times
    the credit; for A_i < 0, tokens it likes less get up to 1 + c times the blame. When the teacher agrees with the
    student (d = 0), or lambda = 0, it is exactly GRPO.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    # nan_to_num: a -inf log-prob on a padded position would give 0 * inf = nan when A_i = 0
    d = torch.nan_to_num((teacher_logp - old_logp).detach())                    # d_t
    w = torch.exp(torch.sign(adv) * d).clamp(1 - clip, 1 + clip)                # w_t
    return adv * ((1 - lam) + lam * w)                                           # A_{i,t}


def share(args, step):
    """The schedule: lambda after `step` optimizer steps, linearly from --visd-lambda to 0 at --visd-anneal-steps."""
    return args.visd_lambda * max(0.0, 1 - step / args.visd_anneal_steps)


@torch.no_grad()
def ema_update(teacher, student, decay):
    """teacher <- decay * teacher + (1 - decay) * student, every parameter; buffers copied. Under torchrun both are
    sharded alike, so each rank updates its own shards."""
    for model in (teacher, student):
        if hasattr(model, "reshard"):  # FSDP keeps the top-level weights gathered after a forward: back to shards
            model.reshard()
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def main():
    args = cli.parse(VISDArgs, MINIATURE, drop=cli.DISTILLATION_ONLY, bounds=BOUNDS)
    fsdp.init_distributed()
    # frozen: the EMA teacher (fp32, below) and, with --beta, the k3 KL's reference
    cli.start_run(args, models=("student",), frozen=[("student", 4)] + (["student"] if args.beta else []))
    torch.manual_seed(args.seed)
    student, processor = opd.load_student(args)
    forbidden = rollout.forbidden_ids(processor)
    ref = opd.load_frozen(args.student, bf16=args.bf16)[0] if args.beta else None
    grpo_score = grpo.make_score(args, ref, forbidden)
    # the teacher: the policy itself at the start, then its EMA; loaded again from disk because FSDP modules cannot
    # be deepcopied. Not checkpointed: --resume restarts it from the checkpoint's student.
    teacher, _ = opd.load_frozen(f"{args.out}/checkpoint" if args.resume else args.student, dtype=torch.float32,
                                 bf16=args.bf16)
    done = [run.checkpoint_step(args.out) if args.resume else 0]  # optimizer steps so far, for the schedule

    def score(seq, ids, mask, ious, chunk, videos):
        """GRPO's advantages, and the judged EMA teacher's log-probs of the same rollout tokens."""
        out = grpo_score(seq, ids, mask, ious, chunk, videos)
        out["lambda"] = share(args, done[0])
        if out["lambda"] == 0:  # the hand-over is complete: plain GRPO, no judge, no teacher pass
            return out
        rollouts = [s for s in chunk for _ in range(args.group_size)]
        verdicts = [ev.judge(a, s) for a, s in zip(rollout.decode(processor, ids, mask), rollouts)]
        t_seq = rollout.reprompt(processor, chunk, videos, ids, mask, feedback=[v["feedback"] for v in verdicts])
        t_logits = rollout.completion_logits(teacher, t_seq, ids.shape[1], args.temperature, forbidden)
        out["teacher_logp"] = rollout.token_logp(t_logits, ids)
        out["stats"] = {"lambda": out["lambda"], "judged_consistent": sum(v["consistent"] for v in verdicts) /
                        len(verdicts)}
        return out

    def loss_fn(logits, ids, mask, old_logp, scored):
        adv = scored["advantages"]
        if "teacher_logp" in scored:
            adv = visd_advantages(adv, scored["teacher_logp"], old_logp, args.visd_clip, scored["lambda"])
        return grpo.grpo_loss(rollout.token_logp(logits, ids), old_logp, adv, mask, args.clip_eps,
                              scored.get("ref_logp"), args.beta)

    def after_step():  # the EMA teacher follows the student; the schedule moves on
        done[0] += 1
        ema_update(teacher, student, args.visd_decay)

    evals = opd.train(args, student, processor, score, loss_fn, group=args.group_size, epochs=args.ppo_epochs,
                      after_step=after_step, token_mean=True, frames=True)
    run.finish(args, student, processor, evals)


if __name__ == "__main__":
    data.run(main)
