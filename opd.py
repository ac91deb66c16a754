"""Video-OPD: on-policy distillation for temporal video grounding (Li et al. 2026, arXiv 2602.02994).

    python opd.py                                    # the built-in miniature, end to end (minutes on 2 cores)
    python opd.py --student Qwen/Qwen3-VL-8B-Instruct --teacher Qwen/Qwen3-VL-32B-Instruct --data train.json

Per step: the student samples one completion per (video, query) prompt; the teacher scores the *same tokens*
with the *same video tensors*; the per-token reward is the teacher-student log-ratio (Eq. 5) and the loss is the
policy gradient of the reverse KL(student || teacher) (Eq. 6): no clipping, no reference KL, no discount.

This file holds the OPD losses, the teacher's `score`, and the training loop that every other method reuses
(grpo.py, tvdf.py and neighbours/ differ only in `score` / `loss_fn`, i.e. in where the per-token advantage comes
from). Sampling and the log-probs of the sampled tokens are in rollout.py, the metrics in eval.py. ALGO LOGIC marks
the method; each piece of plumbing (command line, run folder, prefetching, FSDP) is one call into lib/.
"""
import math
from dataclasses import dataclass
from typing import Literal

import torch

import data
import eval as ev
import rollout
from lib import cli, fsdp, lora, run, share


@dataclass
class Args(cli.RunArgs):
    out: str = "runs/opd"           # run folder: log.jsonl, checkpoint/, final/
    student: str = None             # student model: hub id or folder (default: the miniature student)
    teacher: str = None             # teacher model, same tokenizer (default: the miniature teacher)
    data: str = None                # training annotations, any format data.py reads (default: miniature train)
    steps: int = 100                # optimizer steps (with --epochs: set from the data)
    epochs: int = 0                 # passes over --data in a shuffled order (official code: 1); 0: --steps of
    #                                 random prompts each (ours). An epoch is samples // prompts_per_step steps
    prompts_per_step: int = 32      # (video, query) prompts per optimizer step (paper: batch 32, Sec. 4.1)
    rollouts_per_prompt: int = 1    # sampled completions per prompt (paper: 1, Sec. 3.1)
    micro_batch: int = 8            # prompts per forward/backward; gradients accumulate to prompts_per_step
    lr: float = 1e-6                # AdamW learning rate (paper: 1e-6, Sec. 4.1)
    schedule: Literal["cosine", "constant"] = "cosine"  # the lr after the warm-up: cosine to 0 (official code:
    #                                 ms-swift's default) | constant
    warmup_ratio: float = 0.03      # linear warm-up over this share of the steps (official code: 0.03)
    warmup_steps: int = 0           # linear warm-up over this many steps instead, when > 0
    weight_decay: float = 0.1       # AdamW weight decay (official code: ms-swift's default)
    grad_clip: float = 1.0          # max gradient norm (official code: ms-swift's default)
    temperature: float = 0.9        # sampling temperature; the student's and the teacher's log-probs are both of
    #                                 logits / temperature (official code: ms-swift's default 0.9, for sampling and
    #                                 the loss alike; the paper gives none)
    max_new_tokens: int = 64        # completion length limit (ours: an answer is ~15 tokens without thinking)
    loss: Literal["sampled", "fullkl"] = "sampled"  # sampled: Eq. 5-6 on the sampled tokens (paper) | fullkl:
    #                                 exact per-token reverse KL over the vocabulary (ours)
    rollouts: Literal["student", "teacher"] = "student"  # student: on-policy (paper) | teacher: off-policy, the
    #                                 teacher's completions (ours; the paper's off-policy ablation distils on
    #                                 ground-truth tokens, App. C)
    kl_chunk: int = 16              # positions per chunk of the full-vocabulary KL
    freeze_vision: bool = True      # keep the vision tower and its merger frozen (official code: freeze_vit,
    #                                 freeze_aligner; the paper does not say)
    fps: float = 2.0                # frames per second sampled from each video (paper: 2, Sec. 4.1)
    max_frames: int = 768           # frame cap per video (official code: FPS_MAX_FRAMES 768)


# The miniature's own settings, used unless a model or data outside the miniature is named (cli.of_miniature).
# Tiny random-init models need a far larger learning rate than 1e-6, and on a ~400-token vocabulary the exact KL is
# cheap and gives the direction to the right digit instead of only "not this digit". lr: fullkl 1e-3 of 3e-4 /
# 1e-3 / 3e-3 on the validation clips (docs/results.md); the sampled estimator's is 1e-3 too, and it needs
# more steps: pass --loss sampled --steps 800. The 200 steps keep the quick start short; the full KL's
# plateau on validation comes at 300 (--steps 300, as the results' runs). A constant lr after 5 warm-up steps, no
# weight decay, T 1, 256 frames, evaluation in batches of the micro-batch's size: the settings every miniature result
# was measured with (ours).
MINIATURE = dict(steps=200, prompts_per_step=16, micro_batch=16, lr=1e-3, warmup_steps=5, max_new_tokens=24,
                 loss="fullkl", eval_every=25, eval_batch_size=16, save_every=100, schedule="constant",
                 weight_decay=0.0, temperature=1.0, max_frames=256)


# ----------------------------------------------------------------------------- the OPD losses
# ALGO LOGIC
def opd_loss(logp, old_logp, teacher_logp, mask):
    """Video-OPD's loss (Eq. 5-6). All [B, T] over completion tokens; mask 1 on real completion tokens.

    r_t = -(log pi_old(a_t) - log pi_teacher(a_t)), detached                 (Eq. 5)
    L = -sum_t ratio_t * r_t,  ratio_t = pi_theta(a_t) / pi_old(a_t)          (Eq. 6)
    Summed over each sequence's tokens and averaged over sequences (as the official code does). Its gradient
    is the policy gradient of the reverse KL(student || teacher) on the student's own samples.
    """
    reward = (teacher_logp - old_logp).detach()                                  # Eq. 5
    ratio = torch.exp(logp - old_logp.detach())                                  # Eq. 6
    return -(ratio * reward * mask).sum(1).mean()                                # Eq. 6


def token_kl(logits, teacher_logits, chunk=16):
    """Exact reverse KL over the vocabulary at each position: sum_v p_s log(p_s / p_t) -> [B, T] in fp32.
    logits, teacher_logits [B, T, V] (already / temperature, forbidden tokens -inf in both).

    Memory: one chunk of `chunk` positions at a time, in the backward pass too. Without the checkpoint around each
    chunk, autograd would keep every chunk's fp32 log-softmaxes and products until backward (about 4x
    [B, T, V] fp32, whatever the chunk: tests/test_opd.py); with it, it keeps only the chunk's inputs (views of
    the logits, which exist anyway) and recomputes the chunk's softmaxes in backward.
    """
    return torch.cat([torch.utils.checkpoint.checkpoint(_chunk_kl, logits[:, t:t + chunk],
                                                        teacher_logits[:, t:t + chunk], use_reentrant=False)
                      for t in range(0, logits.shape[1], chunk)], 1)


def _chunk_kl(logits, teacher_logits):
    """token_kl of one chunk: [B, t, V] x 2 -> [B, t]."""
    s = torch.log_softmax(logits.float(), -1)
    q = torch.log_softmax(teacher_logits.float(), -1)
    # forbidden tokens are -inf in both: zero their terms before the product, or the backward pass is NaN
    return (s.exp() * (s - q).masked_fill(torch.isinf(s), 0.0)).sum(-1)


def fullkl_loss(logits, teacher_logits, mask, chunk=16):
    """Exact per-token reverse KL over the vocabulary (token_kl), summed over tokens, averaged over sequences
    (the same normalisation as opd_loss). logits, teacher_logits [B, T, V]; mask [B, T].
    """
    return (token_kl(logits, teacher_logits, chunk) * mask).sum() / logits.shape[0]


# ----------------------------------------------------------------------------- the models
def check_tokenizers(student_proc, teacher_proc):
    """Teacher and student must agree on every shared token id and on the video token, or scores are garbage."""
    s, t = student_proc.tokenizer.get_vocab(), teacher_proc.tokenizer.get_vocab()
    bad = [tok for tok in s.keys() & t.keys() if s[tok] != t[tok]]
    if bad:
        raise ValueError(f"teacher and student tokenizers disagree on {len(bad)} shared tokens, e.g. {bad[:5]}")
    if student_proc.video_token_id != teacher_proc.video_token_id:
        raise ValueError("teacher and student use different <|video_pad|> ids")


def load_student(args):
    """The trainable student (from the run's checkpoint when resuming) and its processor. With --lora-rank: the
    base model from --student, frozen in the dtype the run computes in, with adapters (new, or the checkpoint's)."""
    adapters = args.lora_rank
    path = f"{args.out}/checkpoint" if args.resume and not adapters else args.student
    # fp32 master weights even on GPU: a bf16 weight cannot take a 1e-6 step (--bf16 autocasts the compute)
    dtype = torch.bfloat16 if adapters and args.bf16 else torch.float32
    model, processor = rollout.load_model(path, device=fsdp.load_device(), dtype=dtype)
    model.train()
    if adapters:
        model = lora.add(model, args, f"{args.out}/checkpoint/{lora.ADAPTER}" if args.resume else None)
    elif args.freeze_vision:
        model.model.visual.requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return fsdp.shard(model, args.bf16), processor


def load_teacher(args, student, processor):
    """The frozen teacher, sharded like the student, its tokenizer checked against the student's -> (teacher,
    vocab): the student's vocabulary size, to which the teacher's logits are cut (rollout.completion_logits)."""
    teacher, teacher_processor = load_frozen(args.teacher, bf16=args.bf16)
    check_tokenizers(processor, teacher_processor)
    return teacher, student.get_output_embeddings().weight.shape[0]


def load_frozen(path, dtype=None, bf16=False):
    """A model for inference only (a teacher, a reference), sharded like the student -> (model, processor)."""
    model, processor = rollout.load_model(path, device=fsdp.load_device(), dtype=dtype)
    return fsdp.shard(model.requires_grad_(False), bf16), processor


# ALGO LOGIC: the teacher's view of the student's tokens
def distillation(args, teacher, vocab, forbidden):
    """Video-OPD's two pieces for train: (score, loss_fn). score is the teacher's view of the rollout's own tokens
    with the same video tensors; loss_fn is Eq. 5-6 (--loss sampled) or the exact reverse KL (--loss fullkl)."""
    def score(seq, ids, mask, ious, chunk, videos):
        t_logits = rollout.completion_logits(teacher, seq, ids.shape[1], args.temperature, forbidden, vocab)
        t_logp = rollout.token_logp(t_logits, ids)
        return {"teacher_logits": t_logits, "teacher_logp": t_logp} if args.loss == "fullkl" else \
            {"teacher_logp": t_logp}

    def loss_fn(logits, ids, mask, old_logp, scored):
        if args.loss == "fullkl":
            return fullkl_loss(logits, scored["teacher_logits"], mask, args.kl_chunk)
        return opd_loss(rollout.token_logp(logits, ids), old_logp, scored["teacher_logp"], mask)

    return score, loss_fn


# ----------------------------------------------------------------------------- the training loop (every method)
def train(args, student, processor, score, loss_fn, rollout_model=None, group=1, epochs=1, pool=None,
          after_step=None, token_mean=False, optimizer=None, frames=False):
    """Rollouts -> score -> update, `args.steps` times -> the evaluation records. Every method's loop.

    score(seq, ids, mask, ious, chunk, videos) -> dict (no grad; e.g. the teacher's log-probs, or GRPO's
        advantages). seq: prompt + completion [B*group, L+T]; ids, mask [B*group, T]; ious: each rollout's
        temporal IoU with its ground truth (the log's, GRPO's reward); chunk, videos: the micro-batch's B samples
        and decoded videos (None unless `frames`: for variants that re-encode the prompt). An optional "stats" entry
        {name: float} is averaged over the step's micro-batches into the log.
    loss_fn(logits, ids, mask, old_logp, scored) -> scalar loss for one micro-batch
    rollout_model: who samples (default: the student, on-policy); group: completions per prompt; epochs: update passes
    over each step's rollouts (1 for OPD: old_logp = logp's value, Eq. 6's ratio is 1); after_step(): called after
    each step's updates (VISD's EMA teacher follows the student there).
    token_mean: loss_fn averages over tokens (GRPO), not over sequences (OPD, DPO): how micro-batches are weighted,
        so that the step's loss is one mean over the whole step, whatever the micro-batch sizes.
    pool: the training samples (default: --data); optimizer: (opt, sched) from make_optimizer, carried over from an
        earlier stage of a curriculum (default: new); frames: `score` gets the decoded videos (VA-OPD, VISD, TEMPO).
    """
    opt, sched = optimizer or make_optimizer(args, student)
    forbidden = rollout.forbidden_ids(processor)
    with run.Run(args, student, processor, opt, sched, pool, group, frames) as loop:  # log, eval, checkpoints, signals
        for step, prepared, timing in loop:  # this rank's prompts of the step, decoded and encoded ahead
            # ALGO LOGIC: sample and score the same tokens (collect), then the loss and the optimizer step (update)
            rollouts = collect(args, rollout_model or student, processor, prepared, score, step, timing)
            loss, grad_norm = update(args, student, rollouts, loss_fn, opt, epochs, token_mean, forbidden, timing)
            sched.step()
            if after_step:
                after_step()
            loop.end_step(step, rollouts, loss, grad_norm)
    return loop.evals


# ALGO LOGIC: the method's steps. Sample and score the same tokens (collect, through `score`), and the update
# (through `loss_fn`): a new method changes `score` and `loss_fn`, not these.
def collect(args, rollout_model, processor, prepared, score, step, timing):
    """One step's rollouts, micro-batch by micro-batch, without gradients -> [dict(seq, ids, mask, scored, ious)].

    prepared: (mb, samples, videos, prompt) per micro-batch, from lib/run.py's prepare; seq: prompt + completion
    [B*group, L+T]; ids, mask [B*group, T]; scored: what `score` returned; ious: each completion's temporal IoU with
    its ground truth. timing: adds the seconds of generate and of scoring."""
    rollouts = []
    for mb, chunk, videos, prompt in prepared:
        prompt = prompt.to(rollout_model.device)
        torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + mb)  # sampling depends on the micro-batch only
        with run.timed(timing, "generate"), fsdp.autocast(args, rollout_model):
            ids, mask = rollout.generate(rollout_model, processor, prompt, args.max_new_tokens,  # sample
                                         args.temperature)
        seq = rollout.append_completion(prompt, ids, mask)
        group = ids.shape[0] // len(chunk)  # rollouts per prompt
        ious = ev.rollout_ious(processor, ids, mask, [s for s in chunk for _ in range(group)])
        # not inference_mode: the scores enter the autograd graph as constants
        with run.timed(timing, "teacher"), torch.no_grad(), fsdp.autocast(args, rollout_model):
            scored = score(seq, ids, mask, ious, chunk, videos)                                   # score
        rollouts.append(dict(seq=share.lean(seq, rollout_model), ids=ids, mask=mask, scored=scored, ious=ious))
    return rollouts


def update(args, student, rollouts, loss_fn, opt, epochs, token_mean, forbidden, timing):
    """`epochs` passes over the step's rollouts, one optimizer step each -> (the last pass's loss, its grad norm).
    The first pass stores each rollout's "old_logp" [B*group, T]: pi_old, the policy that sampled (Eq. 6)."""
    # each micro-batch weighs by its share of the step's sequences (tokens): 4 + 4 + 2 prompts give the gradient
    # of one batch of 10. Per rank: FSDP averages the ranks' gradients, so divide by the mean count over ranks
    units = [r["mask"].sum().item() if token_mean else r["mask"].shape[0] for r in rollouts]
    per_rank = fsdp.mean_over_ranks([sum(units)])[0]
    params = [p for p in student.parameters() if p.requires_grad]
    with run.timed(timing, "student"):
        for _ in range(epochs):
            total = 0.0
            for r, unit in zip(rollouts, units):
                with fsdp.autocast(args, student):
                    logits = rollout.completion_logits(student, r["seq"], r["ids"].shape[1], args.temperature,
                                                       forbidden)
                if "old_logp" not in r:  # first pass = before any update
                    r["old_logp"] = rollout.token_logp(logits, r["ids"]).detach()
                loss = loss_fn(logits, r["ids"], r["mask"], r["old_logp"], r["scored"]) * unit / per_rank  # the loss
                loss.backward()
                total += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            opt.zero_grad()
    return total, (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()


def make_optimizer(args, student):
    """AdamW on the trainable weights and its schedule: a linear warm-up (--warmup-steps, else --warmup-ratio of
    the steps), then --schedule: cosine to 0 over the remaining steps, or constant -> (opt, sched)."""
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * args.steps)

    def factor(s):  # the lr of step s + 1, as a share of --lr
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = (s - warmup) / max(1, args.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1.0
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def main():
    args = cli.parse(Args, MINIATURE)
    if args.rollouts == "teacher" and args.loss == "sampled":
        # the score-function gradient on the teacher's samples is the gradient of no divergence: off-policy
        # distillation is the full-vocabulary KL on the teacher's tokens (GKD with lambda 0)
        raise data.DataError("--rollouts teacher needs --loss fullkl: Eq. 6's sampled estimator is only a KL "
                             "gradient on the student's own samples")
    fsdp.init_distributed()
    cli.start_run(args)
    torch.manual_seed(args.seed)
    student, processor = load_student(args)
    teacher, vocab = load_teacher(args, student, processor)
    score, loss_fn = distillation(args, teacher, vocab, rollout.forbidden_ids(processor))
    evals = train(args, student, processor, score, loss_fn, group=args.rollouts_per_prompt,
                  rollout_model=teacher if args.rollouts == "teacher" else None)
    run.finish(args, student, processor, evals, teacher)


if __name__ == "__main__":
    data.run(main)
