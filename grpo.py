"""GRPO with a temporal-IoU reward: the baseline Video-OPD compares against (TimeLens recipe).

    python grpo.py                                   # the miniature student, same budget knobs as python opd.py
    python grpo.py --student Qwen/Qwen3-VL-8B-Instruct --data train.json --eval-data test.json

A group of G = 8 completions per prompt; reward = IoU of the first parsed span with the ground truth (0 when
unparsable or inverted; no format reward); advantage = reward - group mean (Eq. of GRPO, no std scaling by
default); clipped surrogate; no KL by default. Sampling and scoring are rollout.py's, the loop is opd.py's:
next to opd.py, only `score` (group-normalised IoU instead of the teacher's log-ratio) and the loss differ.
"""
from dataclasses import dataclass

import torch

import data
import opd
import rollout
from lib import cli, fsdp, run


@dataclass
class GRPOArgs(opd.Args):
    out: str = "runs/grpo"          # run folder
    group_size: int = 8             # completions per prompt (TimeLens: 8)
    prompts_per_step: int = 4       # prompts per optimizer step: 4 x 8 = 32 rollouts, OPD's rollouts per step
    micro_batch: int = 2            # prompts per forward/backward (x group_size sequences)
    clip_eps: float = 0.2           # PPO clip range (matters once ppo_epochs > 1)
    ppo_epochs: int = 1             # update passes per batch of rollouts
    scale_rewards: bool = False     # divide advantages by the group's std (Dr. GRPO: don't)
    beta: float = 0.0               # k3 KL to the frozen initial student (0: none, TimeLens)


# OPD's rollouts per step (2 prompts x 8 = 16), and GRPO's own lr and budget, tuned on the validation clips like
# every method: lr 1e-4 of 1e-4 / 3e-4 / 1e-3, and 2,500 steps, past GRPO's plateau (docs/results.md).
MINIATURE = opd.MINIATURE | dict(prompts_per_step=2, micro_batch=2, lr=1e-4, steps=2500, eval_every=50,
                                 eval_batch_size=2)


def group_advantages(rewards, group_size, scale=False):
    """rewards [B*G], groups contiguous -> advantages [B*G]: reward - group mean (/ group std when scale)."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        # one rollout a group: its sample std is NaN; the population std (0) leaves the advantage at 0
        adv = adv / (r.std(1, keepdim=True, correction=1 if group_size > 1 else 0) + 1e-4)
    return adv.flatten()


def grpo_loss(logp, old_logp, advantages, mask, clip_eps=0.2, ref_logp=None, beta=0.0):
    """Clipped surrogate with token-level aggregation. logp, old_logp, mask [B, T]; advantages [B] or [B, T];
    ref_logp [B, T] for the optional k3 KL penalty. Averaged over all real completion tokens of the batch (opd.train
    with token_mean=True weighs micro-batches so that the step's loss is the mean over all of its tokens)."""
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if beta and ref_logp is not None:
        per_token = per_token + beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)  # k3 estimator
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def make_score(args, ref, forbidden):
    """GRPO's score for opd.train: the group-normalised IoU of each completion, one advantage per sequence (and
    the frozen reference's log-probs for the k3 KL when --beta > 0)."""
    def score(seq, ids, mask, ious, chunk, videos):
        out = {"advantages": group_advantages(torch.tensor(ious, device=ids.device), args.group_size,
                                              args.scale_rewards)}
        if ref is not None:
            ref_logits = rollout.completion_logits(ref, seq, ids.shape[1], args.temperature, forbidden)
            out["ref_logp"] = rollout.token_logp(ref_logits, ids)
        return out
    return score


def main():
    args = cli.parse(GRPOArgs, MINIATURE, drop=cli.DISTILLATION_ONLY, bounds=dict(beta=(0, True)))
    fsdp.init_distributed()
    cli.start_run(args, models=("student",), frozen=("student",) if args.beta else ())
    torch.manual_seed(args.seed)
    student, processor = opd.load_student(args)
    forbidden = rollout.forbidden_ids(processor)
    # the frozen initial student, for the k3 KL
    ref = opd.load_frozen(args.student, bf16=args.bf16)[0] if args.beta else None
    score = make_score(args, ref, forbidden)

    def loss_fn(logits, ids, mask, old_logp, scored):
        return grpo_loss(rollout.token_logp(logits, ids), old_logp, scored["advantages"], mask, args.clip_eps,
                         scored.get("ref_logp"), args.beta)

    evals = opd.train(args, student, processor, score, loss_fn, group=args.group_size, epochs=args.ppo_epochs,
                      token_mean=True)  # grpo_loss is a mean over the step's tokens
    run.finish(args, student, processor, evals)


if __name__ == "__main__":
    data.run(main)
