"""TEMPO: temporal preference optimisation, DPO on pairs made by corrupting the video's time axis.

    python -m neighbours.tempo                       # the miniature student, same budget as python opd.py
    python -m neighbours.tempo --pre-sft             # Pre-SFT alignment: DPO halfway through the student's SFT
    python -m neighbours.tempo --perturbation mix --strengths 16,8,4,2 --min-changes 0
    python -m neighbours.tempo --student Qwen/Qwen3-VL-8B-Instruct --data train.json --eval-data test.json

Before any pair is built, only temporally rich clips are kept (`temporally_rich`: at least --min-changes scene
changes). Per step and prompt: the student answers on the clean video (chosen) and on a temporally perturbed copy
of the same video (rejected: frames dropped, shuffled in groups, or groups reversed, strength r); both answers are
scored under the CLEAN video prompt by the student and by the frozen initial student (the DPO reference), and the
loss is DPO's -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))) with beta 0.1. A curriculum runs the steps
in stages r = 16, 8, 4, 2: from strongly corrupted videos (easy pairs, the rejected answer is far off) to mildly
corrupted ones (hard pairs). No teacher and no ground truth: the preference comes from the video alone.
Next to opd.py only `score` (a second, perturbed rollout and the reference's log-probs) and the loss differ.
No --resume (the stages are separate opd.train runs).

TEMPO is arXiv 2503.16929 (Li et al. 2025; v1 "TEMPO: Temporal Preference Optimization of Video LLMs via Difficulty
Scheduling and Pre-SFT Alignment", renamed TEMPLE from v2; code lscpku/TEMPLE). What it says, and what is ours:
- paper (abstract): select videos rich in temporal information; pairs from clean vs perturbed video inputs; the
  perturbation difficulty raised progressively; preference optimisation before instruction tuning (Pre-SFT).
- code: the perturbations drop / shuffle / reverse at r in {2, 4, 8, 16}, the video cut into units; drop keeps
  n // r units, shuffle and reverse permute / reverse the order of consecutive groups of n // r units (each group
  keeps its inner order); stages r16 -> r8 -> r4 -> r2; videos kept with 4-32 TransNetV2 shot cuts (so
  --min-changes 4 for real videos); DPO stages on an instruct model, then SFT on 60k samples.
- beta 0.1: not found in the paper or the scripts (they leave the trainer's default); the value most DPO work uses.
- ours: the unit is one sampled frame (TEMPLE's are scene clips), so on the miniature's 16-frame clips r = 16, 8,
  4, 2 give groups of 1, 2, 4, 8 frames (clamped to >= 1 for shorter clips). The frame count must stay (the
  processor's token layout and the <t seconds> stamps come from the unchanged metadata), so a dropped frame is
  replaced by the last kept frame before it (a freeze) instead of shortening the video. A shuffle that leaves the
  order unchanged is drawn again. TEMPLE builds its pairs once, offline, and its rejected answers from perturbed
  captions; here both answers are sampled by the current student from the videos at every step (on-policy, through
  opd.train), and pairs whose two answers are identical are masked out (no gradient) and counted. AdamW's state
  and the warm-up carry over from stage to stage (a restart would reset the moments at every change of r). The
  temporal-richness score is a plain cut counter (`scene_changes`). Pre-SFT in the miniature: DPO on the student
  halfway through its SFT, then the rest of that SFT (`halfway_student`, `rest_of_sft`).
"""
import json
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, BatchFeature

import data
import eval as ev
import opd
import rollout
import tvdf
from lib import cli, fsdp, run
from lib import miniature as toy

KINDS = ("drop", "shuffle", "reverse")


@dataclass
class DPOArgs(opd.Args):
    out: str = "runs/tempo"           # run folder: log.jsonl (all stages), r16/ r8/ ... (one per stage), final/
    beta: float = 0.1               # DPO temperature on the log-ratio margin
    strengths: str = "16,8,4,2"     # perturbation strengths r, one curriculum stage each, in this order (easy first)
    perturbation: Literal[KINDS + ("mix",)] = "shuffle"  # drop | shuffle | reverse | mix (one of the three drawn
    #                                 per video)
    min_changes: int = 4            # temporally rich clips only: at least this many scene changes (0: all clips)
    pre_sft: bool = False           # Pre-SFT alignment: DPO on the miniature student halfway through its SFT, then
    #                                 the rest of its SFT (miniature only)


# The same miniature budget as opd.MINIATURE (200 steps of 16 prompts, one pair each; eval every 25 steps, so
# every 50-step stage ends on an evaluation). lr: the best of 1e-3 / 1e-4 / 1e-5 on seed 0 (docs/results.md,
# "The earlier miniature").
# min_changes 2: a miniature clip has at most two scene changes (its shape appears, its shape goes).
MINIATURE = opd.MINIATURE | dict(lr=1e-5, min_changes=2)
BOUNDS = dict(beta=(0, False), min_changes=(0, True))


# ----------------------------------------------------------------------------- temporally rich videos
def scene_changes(frames, pixel_delta=40, share=0.05):
    """A temporal-richness score: how many consecutive frame pairs differ in more than `share` of their pixels by
    more than `pixel_delta` grey levels (any channel). frames [N, H, W, 3] uint8 -> int.

    Ours: a plain cut counter in place of TEMPLE's TransNetV2 shot detector and SigLIP scene groups. Its two
    thresholds ignore the miniature's background, which brightens by 20 levels each second, and count its shape
    appearing or going (a quadrant of the frame).
    """
    x = frames.astype(np.int16)
    changed = (np.abs(np.diff(x, axis=0)).max(-1) > pixel_delta).mean((1, 2)) > share
    return int(changed.sum())


def temporally_rich(samples, min_changes, fps=2.0, max_frames=256):
    """The samples whose video has at least `min_changes` scene changes (TEMPLE keeps 4-32 shot cuts)."""
    keep = [s for s in samples if scene_changes(data.load_video(s.video, fps, max_frames)[0]) >= min_changes]
    print(f"temporally rich: {len(keep)} of {len(samples)} clips have >= {min_changes} scene changes")
    if not keep:
        raise data.DataError(f"no clip has >= {min_changes} scene changes: lower --min-changes")
    return keep


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
    return (rollout.token_logp(logits, ids) * mask).sum(1)


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
    return BatchFeature(out)


def main():
    # no --resume: the curriculum runs as separate opd.train stages
    args = cli.parse(DPOArgs, MINIATURE, drop=cli.DISTILLATION_ONLY + ("resume", "epochs"), bounds=BOUNDS)
    fsdp.init_distributed()
    cli.start_run(args, models=("student",), frozen=("student",))
    torch.manual_seed(args.seed)
    pool = data.load_samples(args.data, args.video_root, args.skip_bad)
    pool = temporally_rich(pool, args.min_changes, args.fps, args.max_frames) if args.min_changes else pool
    if args.pre_sft:  # the student becomes the miniature student halfway through its SFT
        sft = halfway_student(args)
    student, processor = opd.load_student(args)
    ref, _ = opd.load_frozen(args.student, bf16=args.bf16)  # the frozen initial student: DPO's reference
    forbidden = rollout.forbidden_ids(processor)

    def make_score(r):
        def score(seq, ids, mask, ious, chunk, videos):
            """The rejected answer (student on the perturbed video) and both answers' reference log-probs, all
            scored under the clean prompt; for the log, the pairs' fraction identical (masked), the rejected
            answers' IoU, and how often the rejected answer is the worse one."""
            # perturbation draws follow train's per-micro-batch torch seed, like the sampling does
            rng = np.random.default_rng(torch.randint(2 ** 31, ()).item())
            bad = [(perturb(frames, r, args.perturbation, rng), meta) for frames, meta in videos]
            bad_prompt = data.encode(processor, chunk, bad).to(student.device)
            r_ids, r_mask = rollout.generate(student, processor, bad_prompt, args.max_new_tokens, args.temperature)
            r_seq = rollout.append_completion(prompt_of(seq, ids.shape[1]), r_ids, r_mask)
            ref_c = sequence_logp(rollout.completion_logits(ref, seq, ids.shape[1], args.temperature, forbidden),
                                  ids, mask)
            ref_r = sequence_logp(rollout.completion_logits(ref, r_seq, r_ids.shape[1], args.temperature, forbidden),
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
        with fsdp.autocast(args, student):
            r_logits = rollout.completion_logits(student, scored["rejected_seq"], r_ids.shape[1], args.temperature,
                                                 forbidden)
        return dpo_loss(sequence_logp(logits, ids, mask), sequence_logp(r_logits, r_ids, scored["rejected_mask"]),
                        scored["ref_c"], scored["ref_r"], args.beta, scored["keep"])

    strengths = [int(x) for x in args.strengths.split(",")]  # the curriculum: one stage per r, easy first
    optimizer = opd.make_optimizer(args, student)  # one AdamW and warm-up over all stages: a stage is not a restart
    evals = tvdf.train_in_stages(args, [f"r{r}" for r in strengths], lambda i, stage_args: opd.train(
        stage_args, student, processor, make_score(strengths[i]), loss_fn, pool=pool, optimizer=optimizer,
        frames=True))
    run.finish(args, student, processor, evals)
    if args.pre_sft:
        rest_of_sft(args, student, processor, evals, *sft)


# ----------------------------------------------------------------------------- Pre-SFT alignment (--pre-sft)
def halfway_student(args):
    """The miniature student rebuilt to half its SFT steps (same seed, data and schedule as toy.build, so the same
    weights it had there), saved to OUT/halfway and made args.student. Returns what the rest of its SFT needs."""
    paths = toy.miniature_paths(os.path.dirname(os.path.abspath(args.student)))
    report = json.load(open(paths["metrics"])) if os.path.exists(paths["metrics"]) else {}
    if "config" not in report or paths["student"] != os.path.abspath(args.student) or fsdp.world() > 1:
        raise data.DataError("--pre-sft rebuilds the SFT of a student lib/miniature.py built (its metrics.json says "
                             "how): "
                             "only on the miniature, in one process")
    cfg = toy.ToyConfig(**report["config"])
    processor = AutoProcessor.from_pretrained(paths["student"])
    fit, _, _ = toy.sft_splits(paths, cfg)
    model = toy.make_model(processor, cfg.student, cfg.student_seed)  # toy.build's init of the student
    _, _, state = toy.sft(model, processor, *fit, cfg.student_steps, cfg, "SFT student, first half",
                          until=report["student_sft_steps"] // 2, feedback_share=cfg.feedback_share)
    args.student = f"{args.out}/halfway"
    model.save_pretrained(args.student)
    processor.save_pretrained(args.student)
    return model, fit, cfg, report, state


def rest_of_sft(args, student, processor, evals, model, fit, cfg, report, state):
    """After DPO: SFT goes on from where it paused (its AdamW state, schedule and batch order) to the step where
    toy.build stopped, then the test metrics: SFT only (the miniature student) vs DPO in the middle of SFT."""
    model.load_state_dict(student.state_dict())
    toy.sft(model, processor, *fit, cfg.student_steps, cfg, "SFT student, second half",
            until=report["student_sft_steps"], state=state, feedback_share=cfg.feedback_share)
    fsdp.save_model(model, processor, f"{args.out}/final")
    test = data.load_samples(args.eval_data, args.video_root, args.skip_bad)
    rows = {"SFT only": report["student"],
            "half SFT": evals[0]["eval"], "half SFT + DPO": evals[-1]["eval"],
            "half SFT + DPO + rest of SFT": ev.evaluate(model, processor, test, fps=args.fps,
                                                        max_frames=args.max_frames)[0]}
    print(ev.format_table(rows))
    with open(f"{args.out}/summary.json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    data.run(main)
