"""Video-OPD: on-policy distillation for temporal video grounding (arXiv 2602.02994).

    python opd.py                                    # the built-in miniature, end to end (minutes on 2 cores)
    python opd.py --student Qwen/Qwen3-VL-8B-Instruct --teacher Qwen/Qwen3-VL-32B-Instruct --data train.json

Per step: the student samples one completion per (video, query) prompt; the teacher scores the *same tokens*
with the *same video tensors*; the per-token reward is the teacher-student log-ratio (Eq. 5) and the loss is the
policy gradient of the reverse KL(student || teacher) (Eq. 6): no clipping, no reference KL, no discount.

`--va` (VA-OPD): the teacher also scores the rollout with a degraded video; the tokens and rollouts whose
teacher log-prob drops most without the video's detail (visual advantage) weigh more in the full-vocabulary KL.

This file also holds the rollout and scoring machinery, the training loop that grpo.py and dpo.py reuse (the
algorithms differ only in `score` / `loss`, i.e. in where the per-token advantage comes from), and the few lines
that let `torchrun` run it on several GPUs with FSDP2.
"""
import argparse
import dataclasses
import functools
import json
import os
import random
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import BatchFeature

import data
import eval as ev


@dataclass
class Args:
    student: str = None             # student model: hub id or folder (default: the miniature student)
    teacher: str = None             # teacher model, same tokenizer (default: the miniature teacher)
    data: str = None                # training annotations, any format data.py reads (default: miniature train)
    eval_data: str = None           # test annotations for periodic greedy evaluation (default: miniature test)
    video_root: str = None          # folder with the videos (default: each annotation file's folder)
    out: str = "runs/opd"           # run folder: log.jsonl, checkpoint/, final/
    steps: int = 100                # optimizer steps
    prompts_per_step: int = 32      # (video, query) prompts per optimizer step (paper: ~32)
    rollouts_per_prompt: int = 1    # sampled completions per prompt (paper: 1)
    micro_batch: int = 8            # prompts per forward/backward; gradients accumulate to prompts_per_step
    lr: float = 1e-6                # AdamW learning rate (paper: 1e-6)
    warmup_steps: int = 0           # linear warm-up, then constant
    weight_decay: float = 0.0       # AdamW weight decay
    grad_clip: float = 1.0          # max gradient norm
    temperature: float = 1.0        # sampling temperature; all log-probs are of logits / temperature
    max_new_tokens: int = 64        # completion length limit
    loss: str = "sampled"           # sampled: Eq. 5-6 on the sampled tokens | fullkl: exact per-token reverse KL
    rollouts: str = "student"       # student: on-policy | teacher: off-policy (teacher-generated completions)
    kl_chunk: int = 16              # positions per chunk of the full-vocabulary KL
    freeze_vision: bool = True      # keep the vision tower frozen (paper)
    gradient_checkpointing: bool = False  # trade compute for activation memory (GPU users)
    bf16: bool = False              # bf16 autocast for forward passes (GPU users)
    fps: float = 2.0                # frames per second sampled from each video (paper: 2)
    max_frames: int = 256           # frame cap per video
    num_workers: int = 1            # DataLoader processes decoding the next steps' videos (0: in the main process)
    eval_every: int = 20            # greedy evaluation every N steps (0: only before and after)
    eval_limit: int = 0             # evaluate on the first N test queries only (0: all)
    save_every: int = 50            # checkpoint every N steps, at the end, and on Ctrl-C / SIGTERM
    resume: bool = False            # continue the run in --out from its checkpoint
    overwrite: bool = False         # replace the run already in --out (without it or --resume: refused)
    skip_bad: bool = False          # train without samples whose video file is missing (else: refused)
    seed: int = 0                   # seeds prompt order, sampling and init
    tvdf_rounds: int = 0            # TVDF curriculum rounds inline (0: off; see tvdf.py)
    tvdf_k: int = 0                 # samples added to the pool per TVDF round
    tvdf_tau: float = 0.5           # TRPV: drop samples whose teacher IoU is below this (see tvdf.py)
    tvdf_strategy: str = "topk"     # DBTP variant: topk | dsus | bbds | gwds | random
    tvdf_pool: int = 0              # candidate pool: the first N training samples (0: all)
    va: bool = False                # VA-OPD: weight rollouts and tokens by the teacher's visual advantage
    va_top: float = 0.2             # VA-OPD: share of each rollout's tokens in the high-VA group
    va_scale: float = 0.1           # VA-OPD: the degraded video's frames are downsampled to this fraction per side


# The miniature's own settings, used when no --student/--teacher/--data is given. Tiny random-init models
# need a far larger learning rate than 1e-6, and on a ~400-token vocabulary the exact KL is cheap and gives the
# direction to the right digit instead of only "not this digit". Measured (README, "Results in miniature"):
# fullkl at lr 1e-3 takes the student from mIoU 68.6 to 96.7 ± 1.1 (teacher 98.0) in 200 steps; the sampled
# estimator at the same lr reaches 73.9 ± 0.9.
MINIATURE = dict(steps=200, prompts_per_step=16, micro_batch=16, lr=1e-3, warmup_steps=5, max_new_tokens=24,
                 loss="fullkl", eval_every=25, save_every=100, tvdf_pool=512)


# The flags that take one of a few values (a typo must not fall back to a default)
CHOICES = dict(loss=("sampled", "fullkl"), rollouts=("student", "teacher"),
               tvdf_strategy=("topk", "dsus", "bbds", "gwds", "random"))
# Lower bounds of the numeric flags: (bound, True if the bound itself is allowed)
BOUNDS = dict(steps=(1, True), prompts_per_step=(1, True), rollouts_per_prompt=(1, True), micro_batch=(1, True),
              lr=(0, False), warmup_steps=(0, True), weight_decay=(0, True), grad_clip=(0, False),
              temperature=(0, False), max_new_tokens=(1, True), kl_chunk=(1, True), fps=(0, False),
              max_frames=(2, True), num_workers=(0, True), eval_every=(0, True), eval_limit=(0, True),
              save_every=(1, True), tvdf_rounds=(0, True), tvdf_k=(0, True), tvdf_pool=(0, True),
              va_top=(0, False), va_scale=(0, False), group_size=(1, True), ppo_epochs=(1, True),
              clip_eps=(0, False), beta=(0, True), visd_clip=(0, False))


# What only opd.py's distillation uses: grpo.py and dpo.py leave these out of their command lines
DISTILLATION_ONLY = ("teacher", "loss", "rollouts", "rollouts_per_prompt", "kl_chunk", "va", "va_top", "va_scale",
                     "tvdf_rounds", "tvdf_k", "tvdf_tau", "tvdf_strategy", "tvdf_pool")


def cli(cls, miniature, drop=(), choices=None):
    """Command line -> cls instance: every dataclass field but `drop` is a flag; the miniature's values fill in
    what the user did not give when no models/data are named. Bad values are a DataError before anything runs."""
    import inspect, re, sys
    helps = {}  # the comment beside each field is its --help line
    for c in reversed(cls.__mro__[:-1]):
        helps |= dict(re.findall(r"^    (\w+): .*?#\s*(.*)$", inspect.getsource(c), re.M))
    doc = sys.modules[cls.__module__].__doc__
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = data.refuse  # one line, not the whole usage
    fields = [f for f in dataclasses.fields(cls) if f.name not in drop]
    for f in fields:
        default = f"default: {f.default}" if f.name not in miniature else \
            f"default: {miniature[f.name]} on the miniature, {f.default} with --student/--data"
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(
            type=f.type if f.type in (int, float) else str, choices=(CHOICES | (choices or {})).get(f.name))
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                       help=f"{helps.get(f.name, '')} ({default})", **kind)
    given = vars(p.parse_args())
    for name, value in given.items():
        low, inclusive = BOUNDS.get(name, (None, True))
        if low is not None and (value < low or (value == low and not inclusive)):
            raise data.DataError(f"--{name.replace('_', '-')} must be {'>=' if inclusive else '>'} {low} (got {value})")
    on_miniature = not any(given.get(k) for k in ("student", "teacher", "data"))
    args = cls(**{**(miniature if on_miniature else {}), **given})
    names = {f.name for f in fields}
    settings = ", ".join(f"{k.replace('_', ' ')} {getattr(args, k)}" for k in (
        "steps", "lr", "loss", "prompts_per_step", "group_size", "max_new_tokens") if k in names)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once
        print(("miniature (no --student/--teacher/--data): " if on_miniature else "paper defaults where not given: ")
              + settings)
    return args


def check_models(args, flags):
    """ev.check_model for each of these flags the user gave."""
    for flag in flags:
        if getattr(args, flag):
            ev.check_model(flag, getattr(args, flag))


def start_run(args, models=("student", "teacher")):
    """Everything that can be wrong with a run's inputs, checked before a model loads or --out is touched:
    the models named, the annotations and their videos, and the run folder (an earlier run in --out is refused
    unless --resume continues it or --overwrite replaces it). Builds the miniature on first use."""
    check_models(args, models)  # what the user named, before the miniature fills in the rest (built once)
    resolve_miniature(args)
    for flag in models:
        if not getattr(args, flag):
            raise data.DataError(f"--{flag} is needed with your own --student / --data")
    data.load_samples(args.data, args.video_root, args.skip_bad)
    if args.eval_data:
        data.load_samples(args.eval_data, args.video_root, args.skip_bad)
    if args.resume:
        if not os.path.exists(f"{args.out}/checkpoint/step.json"):
            raise data.DataError(f"--resume: no checkpoint in {args.out}/checkpoint")
        with open(f"{args.out}/checkpoint/step.json") as f:
            done = json.load(f)["step"]
        if done >= args.steps:  # nothing to train: the finished run stays as it is
            raise data.DataError(f"--resume: {args.out} has trained {done} of --steps {args.steps}; raise --steps "
                                 "to continue it")
    elif os.path.isdir(args.out) and os.listdir(args.out):
        if not args.overwrite:
            raise data.DataError(f"{args.out} already holds a run: --resume continues it, --overwrite replaces it, "
                                 "or choose another --out")
        if rank() == 0:
            import shutil
            shutil.rmtree(args.out)
        barrier()
    return args


# ----------------------------------------------------------------------------- rollout and scoring machinery
def expand(batch, n):
    """Repeat each prompt n times, keeping each video's patches next to its own <|video_pad|> tokens.

    batch: input_ids, attention_mask, mm_token_type_ids [B, L]; video_grid_thw [B, 3];
    pixel_values_videos [sum_i t_i*h_i*w_i, D]. Returns the same keys with B*n rows, prompt i at rows i*n..i*n+n-1.
    """
    if n == 1:
        return batch
    out = {k: v.repeat_interleave(n, 0) for k, v in batch.items() if k != "pixel_values_videos"}
    patches = batch["pixel_values_videos"].split(batch["video_grid_thw"].prod(-1).tolist())
    out["pixel_values_videos"] = torch.cat([p for p in patches for _ in range(n)])
    return BatchFeature(out)


def append_completion(batch, ids, mask):
    """Prompt batch [B, L] + completion ids/mask [B, T] -> one batch [B, L + T] for scoring (completion = text)."""
    seq = dict(batch)
    seq["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    seq["attention_mask"] = torch.cat([batch["attention_mask"], mask], 1)
    seq["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    return BatchFeature(seq)


def reprompt(processor, samples, videos, ids, mask):
    """The same completions ids, mask [B*G, T] behind a prompt built anew from B samples and their videos (G
    copies each): how VA-OPD's degraded video and VISD's hinted query score the rollout's own tokens."""
    prompt = expand(data.encode(processor, samples, videos), ids.shape[0] // len(samples)).to(ids.device)
    return append_completion(prompt, ids, mask)


def completion_logits(model, seq, T, temperature, forbidden, vocab=None):
    """Logits / temperature of the T completion positions only: [B, T, V].

    `logits_to_keep` makes the LM head run on the last T + 1 positions, so the [B, L, V] logits of a long video
    prompt never exist. Forbidden (vision) tokens get -inf: the support is the one sampling used. `vocab` slices
    a teacher whose embedding is padded larger than the student's (Qwen2.5-VL-3B 151,936 vs 7B 152,064 rows).
    """
    logits = model(**seq, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
    logits = logits[..., :vocab] if vocab else logits
    blocked = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    blocked[forbidden] = True
    return (logits / temperature).masked_fill(blocked, float("-inf"))


def token_logp(logits, ids):
    """log pi(a_t) of the chosen tokens: logits [B, T, V], ids [B, T] -> [B, T] in fp32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- the OPD losses
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
    chunk, autograd would keep every chunk's fp32 log-softmaxes and products until backward (measured: ~4x
    [B, T, V] fp32, whatever the chunk; tests/test_opd.py); with it, it keeps only the chunk's inputs (views of
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


# ----------------------------------------------------------------------------- VA-OPD (opd.py --va)
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
    Paper setting: 4 rollouts per prompt, T 0.7, top_p 0.95. top_p is not applied: eval.generate samples purely
    (top_p 1) because every score here must be of the distribution that sampled.
    """
    kl = token_kl(logits, teacher_logits, chunk)
    high = va_split(va, mask, top).float()
    low = mask.float() - high
    mean_high = (kl * high).sum(1) / high.sum(1).clamp(min=1)
    mean_low = (kl * low).sum(1) / low.sum(1).clamp(min=1)
    per_rollout = 0.5 * mean_high + 0.5 * mean_low
    return (va_weights(va, mask, group) * per_rollout).sum() / (kl.shape[0] // group)


# ----------------------------------------------------------------------------- loading and checks
def check_tokenizers(student_proc, teacher_proc):
    """Teacher and student must agree on every shared token id and on the video token, or scores are garbage."""
    s, t = student_proc.tokenizer.get_vocab(), teacher_proc.tokenizer.get_vocab()
    bad = [tok for tok in s.keys() & t.keys() if s[tok] != t[tok]]
    if bad:
        raise ValueError(f"teacher and student tokenizers disagree on {len(bad)} shared tokens, e.g. {bad[:5]}")
    if student_proc.video_token_id != teacher_proc.video_token_id:
        raise ValueError("teacher and student use different <|video_pad|> ids")


def load_student(args):
    """The trainable student (from the run's checkpoint when resuming) and its processor."""
    path = f"{args.out}/checkpoint" if args.resume else args.student
    # fp32 master weights even on GPU: a bf16 weight cannot take a 1e-6 step (--bf16 autocasts the compute)
    model, processor = ev.load_model(path, device=load_device(), dtype=torch.float32)
    model.train()
    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return shard(model), processor


def resolve_miniature(args):
    """Fill the miniature's models and data into whatever the user did not give (building it on first use)."""
    if not (args.student and args.data):  # real runs name their own models and data (grpo.py has no teacher)
        import toy
        if rank() > 0:
            barrier()  # under torchrun rank 0 builds (or finds) the miniature while the others wait
        paths = toy.ensure()
        if rank() == 0:
            barrier()
        args.student = args.student or paths["student"]
        args.teacher = args.teacher or paths["teacher"]
        args.data = args.data or paths["train"]
        args.eval_data = getattr(args, "eval_data", None) or paths["test"]
    return args


# ----------------------------------------------------------------------------- several processes (torchrun + FSDP2)
# `torchrun --nproc_per_node N opd.py ...` runs N copies of this script. Each shards the student and the teacher
# with PyTorch's FSDP2 (`fully_shard`: every rank holds 1/N of each weight and gathers a layer only while running
# it), takes its own 1/N of each step's prompts, and FSDP averages the gradients. A plain `python opd.py` is rank 0
# of 1 and none of this runs. On CPU the same path runs with the gloo backend (tests/test_distributed.py).
def init_distributed():
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU); a no-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    """Wait for every rank (a no-op for a single process)."""
    if dist.is_initialized():
        dist.barrier()


def load_device():
    """Where to load weights: on CPU when sharding (fully_shard moves each rank's shard to its GPU), else the GPU."""
    return "cpu" if dist.is_initialized() or not torch.cuda.is_available() else "cuda"


def shard(model):
    """FSDP2 units: each transformer block (the classes transformers lists as `_no_split_modules`), then the rest."""
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import fully_shard
    mesh = dist.device_mesh.init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world(),))
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP fixes which unit is the root at the first forward. transformers' generate runs the vision tower before
    # the model's forward, which would make a vision block a root of its own: fix the structure now instead.
    model._get_fsdp_state()._lazy_init()
    return model


def save_model(model, processor, path):
    """save_pretrained of the gathered weights, from rank 0: a folder plain transformers loads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = None  # a single process saves its own weights
    if dist.is_initialized():  # gather the shards (every rank must call this)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        model.save_pretrained(path, state_dict=state)
        processor.save_pretrained(path)


def optimizer_state(model, opt):
    """The optimizer's state keyed by parameter name and gathered whole: resumable under any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=dist.is_initialized()))


def mean_over_ranks(values):
    """A list of floats, averaged over ranks (for the log: each rank saw 1/N of the step's rollouts)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return (t / world()).tolist()


# ----------------------------------------------------------------------------- the training loop (OPD, GRPO, DPO)
def plan(args, samples, step):
    """This rank's prompts of one step: [(mb, [Sample])] per micro-batch, mb = the micro-batch's place in the
    whole step (the same under any number of ranks; it seeds the sampling)."""
    idx = random.Random(args.seed * 100_003 + step).sample(range(len(samples)), min(args.prompts_per_step,
                                                                                      len(samples)))
    idx = idx[rank() * len(idx) // world():(rank() + 1) * len(idx) // world()]  # this rank's share
    return [(rank() * len(idx) + i, [samples[j] for j in idx[i:i + args.micro_batch]])
            for i in range(0, len(idx), args.micro_batch)]


def prepare(args, processor, group, micro_batches):
    """plan's micro-batches -> [(mb, samples, videos, prompt)]: the videos decoded, the prompts encoded and
    expanded to `group` rollouts each (CPU work, run in a DataLoader worker while the previous step trains)."""
    out = []
    for mb, chunk in micro_batches:
        videos, _ = ev.load_videos(chunk, fps=args.fps, max_frames=args.max_frames)
        out.append((mb, chunk, videos, expand(data.encode(processor, chunk, videos), group)))
    return out


def train(args, student, processor, score, loss_fn, rollout_model=None, group=1, epochs=1, pool=None,
          after_step=None, token_mean=False, optimizer=None):
    """Rollouts -> score -> update, `args.steps` times. Shared by opd.py, grpo.py and dpo.py.

    score(seq, ids, mask, ious, chunk, videos) -> dict (no grad; e.g. the teacher's log-probs, or GRPO's
        advantages). seq: prompt + completion [B*group, L+T]; ids, mask [B*group, T]; ious: each rollout's
        temporal IoU with its ground truth, decoded once here for the log and for GRPO's reward; chunk, videos:
        the micro-batch's B samples and decoded videos, for variants that re-encode the prompt (VA-OPD, VISD).
        An optional "stats" entry {name: float} is averaged over the step's micro-batches into the log.
    loss_fn(logits, ids, mask, old_logp, scored) -> scalar loss for one micro-batch
    rollout_model: who samples the completions (default: the student, on-policy); group: completions per prompt;
    epochs: update passes over each batch of rollouts (1 for OPD: then old_logp = logp's value, Eq. 6's ratio is 1);
    after_step(): called after each step's updates (VISD's EMA teacher follows the student there).
    token_mean: loss_fn averages over tokens (GRPO), not over sequences (OPD, DPO): how micro-batches are weighted,
        so that the step's loss is one mean over the whole step, whatever the micro-batch sizes.
    optimizer: (opt, sched) from make_optimizer, carried over from an earlier stage of a curriculum (default: new).
    Returns the list of evaluation records.
    """
    rollout_model = rollout_model or student
    if args.prompts_per_step % world():  # every rank must run the same number of micro-batches (FSDP)
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must be divisible by the {world()} processes")
    samples = pool if pool is not None else data.load_samples(args.data, args.video_root, args.skip_bad)
    test = data.load_samples(args.eval_data, args.video_root, args.skip_bad) if args.eval_data else None
    test = test[:args.eval_limit] if test and args.eval_limit else test
    forbidden = ev.forbidden_ids(processor)
    params = [p for p in student.parameters() if p.requires_grad]
    opt, sched = optimizer or make_optimizer(args, student)
    os.makedirs(args.out, exist_ok=True)
    start, wall = 0, 0.0
    if args.resume:
        state = torch.load(f"{args.out}/checkpoint/state.pt", weights_only=False)
        load_optimizer_state(student, opt, state["optimizer"]), sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, wall = state["step"], state["wall"]
    kept = []  # on resume: the log up to the checkpoint (a killed run may have logged steps after it)
    if args.resume and os.path.exists(f"{args.out}/log.jsonl"):
        kept = [r for r in map(json.loads, open(f"{args.out}/log.jsonl")) if r["step"] <= start]
    barrier()  # every rank has read the old log before rank 0 rewrites it
    log = open(f"{args.out}/log.jsonl" if rank() == 0 else os.devnull, "w")  # rank 0 logs for all
    log.writelines(json.dumps(r) + "\n" for r in kept)
    autocast = torch.autocast(student.device.type, torch.bfloat16, enabled=args.bf16)

    def evaluate(step):
        student.eval()
        with autocast:
            metrics, _ = ev.evaluate(student, processor, test, batch_size=args.micro_batch, fps=args.fps,
                                     max_frames=args.max_frames, desc=f"eval @{step}")
        student.train()
        record = {"step": step, "wall": round(wall, 2), "eval": metrics}
        log.write(json.dumps(record) + "\n"), log.flush()
        tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
        return record

    evals = [r for r in kept if "eval" in r] or ([evaluate(start)] if test else [])
    bar = tqdm(range(start, args.steps), desc=os.path.basename(args.out.rstrip("/")), initial=start,
               total=args.steps, disable=rank() > 0)
    # each step's prompts are decoded and encoded by DataLoader workers, ahead of the step that uses them
    loader = torch.utils.data.DataLoader([plan(args, samples, step) for step in range(start, args.steps)],
                                         batch_size=None, num_workers=args.num_workers,
                                         collate_fn=functools.partial(prepare, args, processor, group))
    upcoming = iter(loader)
    # Ctrl-C or SIGTERM: finish this step, save a checkpoint, stop (a second Ctrl-C stops at once)
    stop = []
    previous = {sig: signal.signal(sig, functools.partial(_interrupt, stop)) for sig in (signal.SIGINT, signal.SIGTERM)}
    for step in bar:
        t0, timing = time.time(), dict(generate=0.0, student=0.0, teacher=0.0)
        prepared = next(upcoming)  # waits only if the workers are behind (with --num-workers 0: does the work)
        # 1. rollouts and their scores, micro-batch by micro-batch (no grad)
        rollouts = []
        for mb, chunk, videos, prompt in prepared:
            prompt = prompt.to(student.device)
            tic = time.time()
            torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + mb)  # sampling depends on the micro-batch only
            with autocast:
                ids, mask = ev.generate(rollout_model, processor, prompt, args.max_new_tokens, args.temperature)
            timing["generate"] += time.time() - tic
            seq = append_completion(prompt, ids, mask)
            ious = ev.rollout_ious(processor, ids, mask, [s for s in chunk for _ in range(group)])
            tic = time.time()
            with torch.no_grad(), autocast:  # not inference_mode: scores enter the autograd graph as constants
                scored = score(seq, ids, mask, ious, chunk, videos)
            timing["teacher"] += time.time() - tic
            rollouts.append((seq, ids, mask, scored, ious))
        # 2. updates: epochs passes over the rollouts, one optimizer step each
        tic = time.time()
        old_logps = [None] * len(rollouts)
        # each micro-batch weighs by its share of the step's sequences (tokens): 4 + 4 + 2 prompts give the gradient
        # of one batch of 10. Per rank: FSDP averages the ranks' gradients, so divide by the mean count over ranks
        units = [m.sum().item() if token_mean else m.shape[0] for _, _, m, _, _ in rollouts]
        per_rank = mean_over_ranks([sum(units)])[0]
        for _ in range(epochs):
            stats = dict(loss=0.0)
            for r, (seq, ids, mask, scored, _) in enumerate(rollouts):
                with autocast:
                    logits = completion_logits(student, seq, ids.shape[1], args.temperature, forbidden)
                logp = token_logp(logits, ids)
                if old_logps[r] is None:  # pi_old: the policy that sampled (first pass = before any update)
                    old_logps[r] = logp.detach()
                loss = loss_fn(logits, ids, mask, old_logps[r], scored) * units[r] / per_rank
                loss.backward()
                stats["loss"] += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
            opt.step(), opt.zero_grad()
        sched.step()
        if after_step:
            after_step()
        timing["student"] = time.time() - tic
        # 3. logging: the reverse-KL estimate, the rollouts' IoU (GRPO's reward), throughput, time split
        tokens = sum(m.sum().item() for _, _, m, _, _ in rollouts)
        kl = sum(((old_logps[r] - s["teacher_logp"]) * m).sum().item()  # E[log pi_s - log pi_t] on samples
                 for r, (_, _, m, s, _) in enumerate(rollouts) if "teacher_logp" in s)
        ious = [x for *_, xs in rollouts for x in xs]
        variant = [s.get("stats", {}) for _, _, _, s, _ in rollouts]  # a variant's own numbers (e.g. dpo.py's)
        names = sorted(variant[0])
        loss, kl, tokens, iou, *means = mean_over_ranks([stats["loss"], kl, tokens, sum(ious) / len(ious)] + [
            sum(v[k] for v in variant) / len(variant) for k in names])
        kl, tokens = kl / max(tokens, 1), tokens * world()
        step_time = time.time() - t0
        wall += step_time
        record = {"step": step + 1, "wall": round(wall, 2), "loss": round(loss, 5),
                  "kl": round(kl, 5), "rollout_iou": round(iou, 4), "grad_norm": round(grad_norm, 4),
                  "lr": sched.get_last_lr()[0], "tokens_per_s": round(tokens / step_time, 1),
                  "time": {k: round(v, 3) for k, v in timing.items()} | {
                      "other": round(step_time - sum(timing.values()), 3)}} | {
                      k: round(v, 4) for k, v in zip(names, means)}
        log.write(json.dumps(record) + "\n"), log.flush()
        bar.set_postfix(loss=f"{loss:.3f}", kl=f"{kl:.3f}", iou=f"{iou:.3f}")
        if test and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            evals.append(evaluate(step + 1))
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
            save(args, student, processor, opt, sched, step + 1, wall)
        if stop:
            break
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if stop:
        log.close()
        raise SystemExit(f"interrupted: checkpoint at step {step + 1} in {args.out}/checkpoint; continue with --resume")
    if test and (not evals or evals[-1]["step"] < args.steps):
        evals.append(evaluate(args.steps))
    log.close()
    return evals


def _interrupt(stop, signum, frame):
    """Signal handler of train: the first signal asks the loop to stop after this step, a second stops now."""
    if stop:
        raise KeyboardInterrupt
    stop.append(signum)
    tqdm.write("stopping after this step (Ctrl-C again to stop now)")


def make_optimizer(args, student):
    """AdamW on the trainable weights, linear warm-up over args.warmup_steps, then constant: (opt, sched)."""
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))


def save(args, student, processor, opt, sched, step, wall):
    """A checkpoint plain transformers can load (student + processor) plus what --resume needs. Every rank calls
    it (gathering the shards is collective); rank 0 writes."""
    path = f"{args.out}/checkpoint"
    save_model(student, processor, path)
    state = optimizer_state(student, opt)
    if rank() == 0:
        torch.save({"optimizer": state, "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                    "step": step, "wall": wall, "args": dataclasses.asdict(args)}, f"{path}/state.pt")
        with open(f"{path}/step.json", "w") as f:  # what --resume checks before loading anything
            json.dump({"step": step}, f)
    barrier()  # nobody reads the checkpoint before rank 0 has written it


def train_in_stages(args, names, run):
    """A curriculum (tvdf.py's rounds, dpo.py's strengths): args.steps split over the stages (the remainder to the
    last); run(i, stage_args) trains stage i (an opd.train call) in OUT/<names[i]>/ and returns its evaluation
    records. The stages' logs are joined into OUT/log.jsonl, steps and wall time running on, each record tagged
    with its stage. Returns the joined evaluation records, like opd.train."""
    steps = [args.steps // len(names)] * (len(names) - 1)
    steps.append(args.steps - sum(steps))
    os.makedirs(args.out, exist_ok=True)
    log = open(f"{args.out}/log.jsonl" if rank() == 0 else os.devnull, "w")
    evals, offset = [], (0, 0.0)
    for i, (name, n) in enumerate(zip(names, steps)):
        if n == 0:
            continue
        stage_args = dataclasses.replace(args, out=f"{args.out}/{name}", steps=n, resume=False)
        records = run(i, stage_args)
        later = offset[0] > 0  # a later stage's "before" is the previous stage's "after": logged once
        for rec in map(json.loads, open(f"{stage_args.out}/log.jsonl") if rank() == 0 else []):
            if not (later and rec["step"] == 0):
                rec |= {"step": rec["step"] + offset[0], "wall": round(rec["wall"] + offset[1], 2), "stage": name}
                log.write(json.dumps(rec) + "\n")
        evals += [e | {"step": e["step"] + offset[0]} for e in records if not (later and e["step"] == 0)]
        offset = (offset[0] + n, records[-1]["wall"] + offset[1] if records else offset[1])
    log.close()
    return evals


def teacher_metrics(args, teacher, processor):
    """The teacher's greedy test metrics, cached in the run folder (the teacher never changes)."""
    path = f"{args.out}/teacher_eval.json"
    cached = os.path.exists(path)
    barrier()  # every rank decides before rank 0 writes the file: all of them evaluate, or none
    if cached:
        with open(path) as f:
            return json.load(f)
    test = data.load_annotations(args.eval_data, args.video_root)
    metrics, _ = ev.evaluate(teacher, processor, test[:args.eval_limit] if args.eval_limit else test,
                             batch_size=args.micro_batch, fps=args.fps, max_frames=args.max_frames, desc="teacher")
    if rank() == 0:
        with open(path, "w") as f:
            json.dump(metrics, f)
    return metrics


def main():
    args = cli(Args, MINIATURE)
    if args.rollouts == "teacher" and args.loss == "sampled" and not args.va:
        # the score-function gradient on the teacher's samples is the gradient of no divergence: off-policy
        # distillation is the full-vocabulary KL on the teacher's tokens (GKD with lambda 0)
        raise data.DataError("--rollouts teacher needs --loss fullkl: Eq. 6's sampled estimator is only a KL "
                             "gradient on the student's own samples")
    init_distributed()
    start_run(args)
    torch.manual_seed(args.seed)
    student, processor = load_student(args)
    teacher, teacher_processor = ev.load_model(args.teacher, device=load_device())
    teacher = shard(teacher.requires_grad_(False))  # inference only, sharded like the student
    check_tokenizers(processor, teacher_processor)
    forbidden = ev.forbidden_ids(processor)
    vocab = student.get_output_embeddings().weight.shape[0]

    def score(seq, ids, mask, ious, chunk, videos):
        """The teacher's view of the same tokens with the same video tensors (and, for VA-OPD, a degraded video)."""
        t_logits = completion_logits(teacher, seq, ids.shape[1], args.temperature, forbidden, vocab)
        t_logp = token_logp(t_logits, ids)
        if args.va:
            group = ids.shape[0] // len(chunk)  # from the shapes: tvdf.curriculum trains with one rollout per prompt
            d_seq = reprompt(processor, chunk, [(degrade(frames, args.va_scale), meta) for frames, meta in videos],
                             ids, mask)
            if not torch.equal(d_seq["input_ids"], seq["input_ids"]):
                raise ValueError("the degraded video changed the prompt's token layout")
            d_logits = completion_logits(teacher, d_seq, ids.shape[1], args.temperature, forbidden, vocab)
            va = visual_advantage(t_logp, token_logp(d_logits, ids), mask)
            return {"teacher_logits": t_logits, "teacher_logp": t_logp, "group": group, "va": va,
                    "stats": {"va": (va.sum() / mask.sum()).item()}}  # the mean visual advantage, for the log
        if args.loss == "fullkl":
            return {"teacher_logits": t_logits, "teacher_logp": t_logp}
        return {"teacher_logp": t_logp}

    def loss_fn(logits, ids, mask, old_logp, scored):
        if args.va:
            return va_opd_loss(logits, scored["teacher_logits"], scored["va"], mask, scored["group"], args.va_top,
                               args.kl_chunk)
        if args.loss == "fullkl":
            return fullkl_loss(logits, scored["teacher_logits"], mask, args.kl_chunk)
        return opd_loss(token_logp(logits, ids), old_logp, scored["teacher_logp"], mask)

    if args.tvdf_rounds:
        import tvdf
        evals = tvdf.curriculum(args, student, processor, teacher, score, loss_fn)
    else:
        evals = train(args, student, processor, score, loss_fn,
                      rollout_model=teacher if args.rollouts == "teacher" else None, group=args.rollouts_per_prompt)
    save_model(student, processor, f"{args.out}/final")
    if evals:
        rows = {"student before": evals[0]["eval"], "student after": evals[-1]["eval"],
                "teacher": teacher_metrics(args, teacher, processor)}
    if evals and rank() == 0:
        print(ev.format_table(rows))
        with open(f"{args.out}/summary.json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    data.run(main)
