"""TEMPO: temporal preference optimisation, DPO on pairs made by corrupting the video's time axis.

    python dpo.py                                    # the miniature student, same budget as python opd.py
    python dpo.py --perturbation mix --strengths 16,8,4,2
    python dpo.py --student Qwen/Qwen3-VL-8B-Instruct --data train.json --eval-data test.json

Per step and prompt: the student answers on the clean video (chosen) and on a temporally perturbed copy of the
same video (rejected: frames dropped, shuffled in groups, or groups reversed, strength r); both answers are scored
under the CLEAN video prompt by the student and by the frozen initial student (the DPO reference), and the loss is
DPO's -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))) with beta 0.1. A curriculum runs the steps in
stages r = 16, 8, 4, 2: from strongly corrupted videos (easy pairs, the rejected answer is far off) to mildly
corrupted ones (hard pairs). No teacher and no ground truth: the preference comes from the video alone.
Next to opd.py only `score` (a second, perturbed rollout and the reference's log-probs) and the loss differ.
No --resume (the stages are separate opd.train runs).

What the papers say, and what is interpretation here:
- The issue names Li et al. 2025, "Temporal Preference Optimization for Long-Form Video Understanding" (TPO,
  arXiv 2501.13919). Its abstract builds preference pairs by manipulating the video input so that the preferred
  answer is better grounded than the dis-preferred one, at two granularities (a localized segment, the whole
  video). We found no strength r or easy-to-hard schedule there.
- The perturbations and the strength r in {16, 8, 4, 2} with an r16 -> r8 -> r4 -> r2 curriculum match TEMPLE
  (S. Li et al. 2025, arXiv 2503.16929, code lscpku/TEMPLE), which we follow: the video is cut into units;
  drop keeps max(1, n // r) of the n units (random ones) and removes the rest; shuffle and reverse cut it into
  consecutive groups of max(1, n // r) units and permute / reverse the order of the groups (each group keeps its
  inner order). So r 16 = strongest corruption (1/16 kept, or the finest groups) = easy, r 2 = mildest = hard.
- Interpretation: the unit is one sampled frame (TEMPLE's units are scene clips), so on the miniature's 16-frame
  clips r = 16, 8, 4, 2 give groups of 1, 2, 4, 8 frames; the group size is clamped to >= 1 for shorter clips.
  The frame count must stay (the processor's token layout and the <t seconds> stamps come from the unchanged
  metadata), so a dropped frame is replaced by the last kept frame before it (a freeze; the first kept frame
  when none is before it) instead of shortening the video. A shuffle that leaves the order unchanged is drawn
  again (with r = 2 TEMPLE's shuffle keeps the video as it is half the time). TEMPLE generates its pairs once,
  offline; here both answers are sampled by the current student at every step (on-policy, through opd.train),
  pairs whose two answers are identical are masked out (they carry no gradient) and counted, and each stage of
  the curriculum is one opd.train call; AdamW's state and the warm-up carry over from stage to stage (ours: the
  papers do not say; a restart would reset the moments at every change of r).
"""
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
import eval as ev
import opd

KINDS = ("drop", "shuffle", "reverse")


@dataclass
class DPOArgs(opd.Args):
    out: str = "runs/dpo"           # run folder: log.jsonl (all stages), r16/ r8/ ... (one per stage), final/
    beta: float = 0.1               # DPO temperature on the log-ratio margin
    strengths: str = "16,8,4,2"     # perturbation strengths r, one curriculum stage each, in this order (easy first)
    perturbation: str = "shuffle"   # drop | shuffle | reverse | mix (one of the three drawn per video)


# The same miniature budget as opd.MINIATURE (200 steps of 16 prompts, one pair each; eval every 25 steps, so
# every 50-step stage ends on an evaluation). lr: the best of three tried on seed 0 (final mIoU from 68.6):
# 1e-3 (opd's) collapsed to ~0 by the r 8 stage, 1e-4 ended at 49.3, 1e-5 at 64.5.
MINIATURE = opd.MINIATURE | dict(lr=1e-5)


# ----------------------------------------------------------------------------- the perturbations
def perturb_order(n, r, kind, rng):
    """Which source frame fills each of the n positions of the perturbed video: [n] int indices.

    drop: keep max(1, n // r) random frames; each dropped position shows the last kept frame before it.
    shuffle / reverse: consecutive groups of g = max(1, n // r) frames, groups permuted / in reverse order.
    """
    g = max(1, n // r)  # TEMPLE's group size n // r, clamped: r larger than the clip gives one frame per group
    if kind == "drop":
        kept = np.sort(rng.choice(n, size=max(1, n // r), replace=False))  # TEMPLE: keep max(1, n // r) units
        before = np.searchsorted(kept, np.arange(n), side="right") - 1  # last kept position <= i, -1 if none
        return kept[np.maximum(before, 0)]
    groups = [np.arange(i, min(i + g, n)) for i in range(0, n, g)]
    if kind == "reverse":
        return np.concatenate(groups[::-1])
    if kind == "shuffle":
        perm = np.arange(len(groups))
        while len(groups) > 1 and (perm == np.arange(len(groups))).all():  # an unchanged video is no rejection
            perm = rng.permutation(len(groups))
        return np.concatenate([groups[p] for p in perm])
    raise ValueError(f"unknown perturbation {kind!r}; one of {KINDS} or mix")


def perturb(frames, r, kind, rng):
    """frames [N, H, W, 3] as data.load_video returns them -> the same shape, temporally corrupted with
    strength r (16 strongest ... 2 mildest). kind: drop | shuffle | reverse | mix (one of the three at random)."""
    kind = KINDS[rng.integers(len(KINDS))] if kind == "mix" else kind
    return frames[perturb_order(len(frames), r, kind, rng)]


# ----------------------------------------------------------------------------- the DPO loss
def dpo_loss(logp_c, logp_r, ref_c, ref_r, beta=0.1, keep=None):
    """DPO on sequence log-probs. All [B]: sum over completion tokens of log pi(a_t) for the chosen (c) and
    rejected (r) answers, under the policy (logp_*) and the frozen reference (ref_*).

    L = -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))), mean over the pairs with keep True
    (default all); 0 (with a graph) when no pair is kept.
    """
    keep = torch.ones_like(logp_c, dtype=torch.bool) if keep is None else keep
    margin = (logp_c - ref_c.detach()) - (logp_r - ref_r.detach())  # DPO (Rafailov et al. 2023), Eq. 7
    losses = -F.logsigmoid(beta * margin)                             # Eq. 7
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def sequence_logp(logits, ids, mask):
    """Sum of the answer's token log-probs: logits [B, T, V], ids, mask [B, T] -> [B]."""
    return (opd.token_logp(logits, ids) * mask).sum(1)


def same_answer(ids_a, mask_a, ids_b, mask_b):
    """[B] bool: the two answers are the same token sequence. ids/mask [B, Ta] and [B, Tb] (Ta, Tb may differ)."""
    T = max(ids_a.shape[1], ids_b.shape[1])
    a = F.pad(ids_a * mask_a, (0, T - ids_a.shape[1]))  # 0 outside the answer: compare real tokens only
    b = F.pad(ids_b * mask_b, (0, T - ids_b.shape[1]))
    return (a == b).all(1) & (mask_a.sum(1) == mask_b.sum(1))


def prompt_of(seq, T):
    """Prompt + completion batch [B, L + T] -> the prompt batch [B, L] (same video tensors)."""
    L = seq["input_ids"].shape[1] - T
    out = dict(seq)
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[k] = seq[k][:, :L]
    return opd.BatchFeature(out)


def main():
    # no --resume: the curriculum runs as separate opd.train stages
    args = opd.cli(DPOArgs, MINIATURE, drop=opd.DISTILLATION_ONLY + ("resume",),
                   choices={"perturbation": KINDS + ("mix",)})
    opd.init_distributed()
    opd.start_run(args, models=("student",))
    torch.manual_seed(args.seed)
    student, processor = opd.load_student(args)
    ref, _ = ev.load_model(args.student, device=opd.load_device())  # the frozen initial student: DPO's reference
    ref = opd.shard(ref.requires_grad_(False))
    forbidden = ev.forbidden_ids(processor)
    autocast = torch.autocast(student.device.type, torch.bfloat16, enabled=args.bf16)

    def make_score(r):
        def score(seq, ids, mask, ious, chunk, videos):
            """The rejected answer (student on the perturbed video) and both answers' reference log-probs, all
            scored under the clean prompt; for the log, the pairs' fraction identical (masked), the rejected
            answers' IoU, and how often the rejected answer is the worse one."""
            # perturbation draws follow train's per-micro-batch torch seed, like the sampling does
            rng = np.random.default_rng(torch.randint(2 ** 31, ()).item())
            bad = [(perturb(frames, r, args.perturbation, rng), meta) for frames, meta in videos]
            bad_prompt = data.encode(processor, chunk, bad).to(student.device)
            r_ids, r_mask = ev.generate(student, processor, bad_prompt, args.max_new_tokens, args.temperature)
            r_seq = opd.append_completion(prompt_of(seq, ids.shape[1]), r_ids, r_mask)
            ref_c = sequence_logp(opd.completion_logits(ref, seq, ids.shape[1], args.temperature, forbidden),
                                  ids, mask)
            ref_r = sequence_logp(opd.completion_logits(ref, r_seq, r_ids.shape[1], args.temperature, forbidden),
                                  r_ids, r_mask)
            same = same_answer(ids, mask, r_ids, r_mask)
            r_ious = ev.rollout_ious(processor, r_ids, r_mask, chunk)
            stats = {"identical": same.float().mean().item(), "rejected_iou": sum(r_ious) / len(r_ious),  # the log
                     "rejected_worse": sum(b < a for a, b in zip(ious, r_ious)) / len(r_ious)}
            return {"rejected_seq": r_seq, "rejected_ids": r_ids, "rejected_mask": r_mask, "ref_c": ref_c,
                    "ref_r": ref_r, "keep": ~same, "stats": stats}
        return score

    def loss_fn(logits, ids, mask, old_logp, scored):
        """DPO: the chosen answer's logits come from opd.train, the rejected one's are computed here."""
        r_ids = scored["rejected_ids"]
        with autocast:
            r_logits = opd.completion_logits(student, scored["rejected_seq"], r_ids.shape[1], args.temperature,
                                             forbidden)
        return dpo_loss(sequence_logp(logits, ids, mask), sequence_logp(r_logits, r_ids, scored["rejected_mask"]),
                        scored["ref_c"], scored["ref_r"], args.beta, scored["keep"])

    strengths = [int(x) for x in args.strengths.split(",")]  # the curriculum: one stage per r, easy first
    optimizer = opd.make_optimizer(args, student)  # one AdamW and warm-up over all stages: a stage is not a restart
    evals = opd.train_in_stages(args, [f"r{r}" for r in strengths], lambda i, stage_args: opd.train(
        stage_args, student, processor, make_score(strengths[i]), loss_fn, optimizer=optimizer))
    opd.save_model(student, processor, f"{args.out}/final")
    if evals and opd.rank() == 0:
        rows = {"student before": evals[0]["eval"], "student after": evals[-1]["eval"]}
        print(ev.format_table(rows))
        with open(f"{args.out}/summary.json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    data.run(main)
