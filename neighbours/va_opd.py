"""VA-OPD: visual-advantage on-policy distillation (Liu et al. 2026, arXiv 2605.21924), on Video-OPD's loop.

    python -m neighbours.va_opd          # the miniature, VA-OPD's setting: 4 prompts x 4 rollouts, T 0.7
    python -m neighbours.va_opd --student Qwen/Qwen3-VL-2B-Instruct --teacher Qwen/Qwen3-VL-8B-Instruct --data T.json

The teacher scores each rollout twice: with the video, and with a degraded copy whose detail is gone (`degrade`).
The visual advantage of a token is how much the teacher's log-prob of it rests on that detail
(`visual_advantage`). Rollouts with more of it weigh more (`va_weights`), and within a rollout its high-VA tokens
and the rest are averaged separately (`va_split`), so that the few vision-critical tokens are not diluted by the
language around them (`va_opd_loss`, a weighted full-vocabulary reverse KL against the clean-video teacher).
Next to opd.py only `score` (the second, degraded teacher pass) and the loss differ.

Where each choice comes from (paper = the abstract, the only text we could read; code = the authors' release
handsome-rich/VA-OPD, whose settings table is "checked against Appendix A"):
- VA as the teacher's log-prob difference with vs without fine visual detail; rollout-level reweighting by the
  rollout's mean VA; token-level KL averaged within the high-VA and the low-VA group separately: paper.
- the degraded view (each side bilinearly downsampled to 10%, nearest-neighbour back), VA clamped at 0, population
  z-score within a prompt's rollouts then softmax at temperature 1, the top 20% of tokens as the high group, the two
  group means weighted 0.5 / 0.5, 4 rollouts per prompt at T 0.7: code.
- ceil(0.2 T) with ties to the earlier token: the code's own choice (its comments say the paper gives none).
- ours: top_p 0.95 (code) is not applied, and the teacher scores at the sampling temperature (the code scores both
  at T 1): here every log-prob is of the distribution that sampled (rollout.generate, rollout.completion_logits).
"""
from dataclasses import dataclass

import torch

import data
import opd
import rollout
from lib import cli, fsdp, run


@dataclass
class VAArgs(opd.Args):
    out: str = "runs/va_opd"        # run folder
    rollouts_per_prompt: int = 4    # rollouts per prompt, the group va_weights normalises over (paper: 4)
    temperature: float = 0.7        # sampling temperature (paper: 0.7; its top_p 0.95 is not applied, see va_opd_loss)
    va_top: float = 0.2             # share of each rollout's tokens in the high-VA group
    va_scale: float = 0.1           # the degraded video's frames are downsampled to this fraction per side


# OPD's miniature settings, with 4 prompts x 4 rollouts per step (16 rollouts, as OPD's 16 x 1) at VA-OPD's T 0.7
MINIATURE = opd.MINIATURE | dict(prompts_per_step=4, temperature=0.7)
BOUNDS = dict(va_top=(0, False), va_scale=(0, False))


def degrade(frames, scale=0.1):
    """The teacher's low-information view of a video: frames uint8 [N, H, W, 3] -> uint8 [N, H, W, 3].

    Each frame is bilinearly downsampled to round(scale * H) x round(scale * W) (at least 1 x 1; plain bilinear,
    no anti-aliasing, like cv2.INTER_LINEAR) and nearest-neighbour upsampled back, so the processor makes the
    same patches and the prompt keeps the same token layout; only the detail is gone.
    """
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    small = torch.nn.functional.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                            mode="bilinear", align_corners=False)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="nearest-exact")
    return big.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def visual_advantage(clean_logp, degraded_logp, mask):
    """a_t = max(log pi_T(a_t | clean video) - log pi_T(a_t | degraded video), 0), detached; 0 off the mask.
    All [B, T]: how much the teacher's confidence in the sampled token rests on seeing the video's detail."""
    return ((clean_logp - degraded_logp).clamp(min=0) * mask).detach()


def va_weights(va, mask, group):
    """Rollout weights: va, mask [B*K, T] (prompt i's K rollouts at rows i*K..i*K+K-1) -> w [B*K].

    Each rollout's mean VA over its real tokens, z-scored within its group (population std + 1e-6), softmax over
    the group at temperature 1: the K weights of a prompt sum to 1 (uniform when the means are equal, or K = 1).
    """
    mean = ((va * mask).sum(1) / mask.sum(1).clamp(min=1)).view(-1, group)
    z = (mean - mean.mean(1, keepdim=True)) / (mean.std(1, unbiased=False, keepdim=True) + 1e-6)
    return torch.softmax(z, 1).flatten()


def va_split(va, mask, top=0.2):
    """The high-VA token group: va, mask [B, T] -> bool [B, T], each row's top ceil(top * T_b) real tokens by VA,
    T_b = that row's number of real tokens (ties: the earlier token). The low group is the row's other tokens."""
    real = mask.bool()
    # - 1e-6: float error must not make ceil(0.2 * 5) 2
    n_high = torch.ceil(top * real.sum(1).double() - 1e-6).long()
    rank = va.masked_fill(~real, float("-inf")).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return (rank < n_high.unsqueeze(1)) & real


def va_opd_loss(logits, teacher_logits, va, mask, group, top=0.2, chunk=16):
    """VA-OPD's loss. logits, teacher_logits [B*K, T, V] (the clean-video teacher; / temperature, forbidden -inf);
    va, mask [B*K, T]; K = group rollouts per prompt, contiguous.

    L_prompt = sum_k w_k [0.5 mean_{t in high_k} KL_t + 0.5 mean_{t in low_k} KL_t], KL_t = token_kl,
    w = va_weights, high_k = va_split (top ceil(top * T_k) tokens by VA), low_k = the rest of rollout k's tokens.
    Normalisation: means over each token group (an empty group contributes 0, e.g. the low group of a
    one-token rollout), a weighted sum over the group's rollouts, then the mean over the B prompts; unlike
    fullkl_loss, which sums over tokens.
    Paper setting: 4 rollouts per prompt, T 0.7, top_p 0.95. top_p is not applied: rollout.generate samples purely
    (top_p 1) because every score here must be of the distribution that sampled.
    """
    kl = opd.token_kl(logits, teacher_logits, chunk)
    high = va_split(va, mask, top).float()
    low = mask.float() - high
    mean_high = (kl * high).sum(1) / high.sum(1).clamp(min=1)
    mean_low = (kl * low).sum(1) / low.sum(1).clamp(min=1)
    per_rollout = 0.5 * mean_high + 0.5 * mean_low
    return (va_weights(va, mask, group) * per_rollout).sum() / (kl.shape[0] // group)


def main():
    args = cli.parse(VAArgs, MINIATURE, drop=("loss", "rollouts"), bounds=BOUNDS)
    fsdp.init_distributed()
    cli.start_run(args)
    torch.manual_seed(args.seed)
    student, processor = opd.load_student(args)
    teacher, vocab = opd.load_teacher(args, student, processor)
    forbidden = rollout.forbidden_ids(processor)

    def score(seq, ids, mask, ious, chunk, videos):
        """The teacher's view of the same tokens with the same video tensors, and with the degraded video."""
        t_logits = rollout.completion_logits(teacher, seq, ids.shape[1], args.temperature, forbidden, vocab)
        t_logp = rollout.token_logp(t_logits, ids)
        d_seq = rollout.reprompt(processor, chunk, [(degrade(frames, args.va_scale), meta) for frames, meta in videos],
                                 ids, mask)
        if not torch.equal(d_seq["input_ids"], seq["input_ids"]):
            raise ValueError("the degraded video changed the prompt's token layout")
        d_logits = rollout.completion_logits(teacher, d_seq, ids.shape[1], args.temperature, forbidden, vocab)
        va = visual_advantage(t_logp, rollout.token_logp(d_logits, ids), mask)
        return {"teacher_logits": t_logits, "teacher_logp": t_logp, "va": va,
                "stats": {"va": (va.sum() / mask.sum()).item()}}  # the mean visual advantage, for the log

    def loss_fn(logits, ids, mask, old_logp, scored):
        return va_opd_loss(logits, scored["teacher_logits"], scored["va"], mask, args.rollouts_per_prompt,
                           args.va_top, args.kl_chunk)

    evals = opd.train(args, student, processor, score, loss_fn, group=args.rollouts_per_prompt, frames=True)
    run.finish(args, student, processor, evals, teacher)


if __name__ == "__main__":
    data.run(main)
