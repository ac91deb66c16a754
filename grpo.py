"""GRPO with a temporal-IoU reward: the baseline Video-OPD compares against (TimeLens recipe).

    python grpo.py                                   # the miniature student, same budget knobs as python opd.py
    python grpo.py --student Qwen/Qwen3-VL-8B-Instruct --data train.json --eval-data test.json

A group of G = 8 completions per prompt; reward = IoU of the first parsed span with the ground truth (0 when
unparsable or inverted; no format reward); advantage = reward - group mean (Eq. of GRPO, no std scaling by
default); clipped surrogate; no KL by default. The rollout/scoring machinery and the loop are opd.py's:
next to opd.py, only `score` (group-normalised IoU instead of the teacher's log-ratio) and the loss differ.

    python grpo.py --visd                            # VISD: GRPO's sign, a privileged EMA teacher's magnitude

`--visd` (structured self-distillation): the direction of each token's update still comes from the GRPO
advantage A_i, its magnitude from a teacher: an EMA copy of the policy that reads the ground-truth span in its
prompt (privileged information) and scores the same rollout tokens. See `visd_advantages` for the formula.
"""
import dataclasses
from dataclasses import dataclass

import torch

import data
import eval as ev
import opd


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
    visd: bool = False              # VISD: per-token advantage A_i * clip(teacher ratio), EMA teacher with the answer
    visd_decay: float = 0.99        # VISD: EMA decay of the teacher, per optimizer step
    visd_clip: float = 0.5          # VISD: token weights clipped to [1 - c, 1 + c] (0 < c < 1)


# The same miniature budget as opd.MINIATURE: steps, rollouts per step (2 prompts x 8 = 16), eval cadence. The lr
# is GRPO's better of two tried: at opd's 1e-3 it collapsed (mIoU 68.6 -> ~55); at 3e-4 its best is 68.9 ± 0.4
# over 3 seeds (README), though seed 0 ends at 51.
MINIATURE = opd.MINIATURE | dict(prompts_per_step=2, micro_batch=2, lr=3e-4)


def group_advantages(rewards, group_size, scale=False):
    """rewards [B*G], groups contiguous -> advantages [B*G]: reward - group mean (/ group std when scale)."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
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


# ----------------------------------------------------------------------------- VISD (--visd)
def hint_query(sample):
    """The privileged query: the sentence plus its ground-truth span, written in the answer's own format."""
    start, end = sample.span
    return f"{sample.query}. Hint: {data.ANSWER.format(start=start, end=end)}"


def visd_advantages(advantages, teacher_logp, old_logp, clip):
    """VISD's per-token advantages: advantages [B] (GRPO's A_i); teacher_logp, old_logp [B, T] -> [B, T].

    Our interpretation (the paper gives no exact formula):
        d_t = log pi_teacher(a_t | x, hint) - log pi_old(a_t | x)                 (detached)
        m_t = clip(exp(sign(A_i) * d_t), 1 - c, 1 + c)
        A_{i,t} = A_i * m_t
    The sign is A_i's (m_t > 0): the group's outcome decides the direction, the teacher only redistributes
    credit within the sequence. For A_i > 0, tokens the answer-aware teacher likes more than the student get
    up to 1 + c times the credit; for A_i < 0, tokens it likes less get up to 1 + c times the blame. m_t is a
    probability ratio (pi_teacher / pi_old, or its inverse), clipped like PPO's, so when the teacher agrees with
    the student (d = 0) it is exactly GRPO.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    # nan_to_num: a -inf log-prob on a padded position would give 0 * inf = nan when A_i = 0
    d = torch.nan_to_num((teacher_logp - old_logp).detach())                    # d_t
    return adv * torch.exp(torch.sign(adv) * d).clamp(1 - clip, 1 + clip)       # A_i * m_t


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
    args = opd.cli(GRPOArgs, MINIATURE, drop=opd.DISTILLATION_ONLY)
    opd.init_distributed()
    opd.start_run(args, models=("student",))
    torch.manual_seed(args.seed)
    student, processor = opd.load_student(args)
    forbidden = ev.forbidden_ids(processor)
    ref = None
    if args.beta:
        ref, _ = ev.load_model(args.student, device=opd.load_device())
        ref = opd.shard(ref.requires_grad_(False))
    teacher = None
    if args.visd:  # VISD's teacher: the policy itself at start, then its EMA (not checkpointed: --resume restarts it)
        teacher, _ = ev.load_model(f"{args.out}/checkpoint" if args.resume else args.student,  # (FSDP cannot
                                   device=opd.load_device(), dtype=torch.float32)              # deepcopy)
        teacher = opd.shard(teacher.requires_grad_(False))

    def score(seq, ids, mask, ious, chunk, videos):
        """The group-normalised IoU of each completion: one advantage per sequence (+ VISD's teacher log-probs)."""
        rewards = torch.tensor(ious, device=ids.device)
        out = {"advantages": group_advantages(rewards, args.group_size, args.scale_rewards)}
        if ref is not None:
            out["ref_logp"] = opd.token_logp(opd.completion_logits(ref, seq, ids.shape[1], args.temperature,
                                                                   forbidden), ids)
        if teacher is not None:  # VISD: the EMA teacher reads the answer, then scores the same rollout tokens
            t_seq = opd.reprompt(processor, [dataclasses.replace(s, query=hint_query(s)) for s in chunk], videos,
                                 ids, mask)
            out["teacher_logp"] = opd.token_logp(opd.completion_logits(teacher, t_seq, ids.shape[1],
                                                                       args.temperature, forbidden), ids)
        return out

    def loss_fn(logits, ids, mask, old_logp, scored):
        adv = scored["advantages"]
        if "teacher_logp" in scored:  # VISD: GRPO's sign, the teacher's per-token magnitude
            adv = visd_advantages(adv, scored["teacher_logp"], old_logp, args.visd_clip)
        return grpo_loss(opd.token_logp(logits, ids), old_logp, adv, mask, args.clip_eps,
                         scored.get("ref_logp"), args.beta)

    ema = (lambda: ema_update(teacher, student, args.visd_decay)) if teacher is not None else None
    evals = opd.train(args, student, processor, score, loss_fn, group=args.group_size, epochs=args.ppo_epochs,
                      after_step=ema, token_mean=True)  # grpo_loss is a mean over the step's tokens
    opd.save_model(student, processor, f"{args.out}/final")
    if evals and opd.rank() == 0:
        print(ev.format_table({"student before": evals[0]["eval"], "student after": evals[-1]["eval"]}))


if __name__ == "__main__":
    data.run(main)
