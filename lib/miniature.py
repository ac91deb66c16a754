"""The built-in miniature: a real Qwen3-VL teacher and student, built and trained offline.

It ships built in miniature/ (MANIFEST.json: a sha256 per file, the versions that built it);
`python -m lib.miniature --out DIR` rebuilds it from scratch. Its SFT is chaotic: other library versions or
another CPU can give another miniature (the stops in build are what a build fixes, not the models). A build makes:
  1. mp4 clips (lib/miniature_clips.py, read like Charades videos): coloured shapes, each visible during its own
     whole-second interval; the query names one ("the red circle"), its interval is the answer. Train/val/test in
     data.py's plain JSONL (val: SFT's stop and every tuning); train_noisy.jsonl with a share of wrong spans, listed in
     noisy.json (TVDF's TRPV); probe.jsonl: two-event clips, each asked for both events (query_dependence);
  2. an offline byte-level BPE tokenizer with the Qwen3-VL special tokens and chat template (digits one per token);
  3. a smaller student and a teacher with 2x its weights, tiny Qwen3VLForConditionalGeneration models (random init),
     each saved beside a real Qwen3VLProcessor, so rollout.load_model("miniature/teacher") takes the path of a hub
     checkpoint;
  4. the teacher made the way the paper's was (official code: a 32B post-trained with GRPO): SFT, then GRPO with the
     project's own grpo.py (grpo_command); the SFT-only teacher ships beside it (teacher_sft: a teacher below what
     GRPO gets out of the student), and an earlier SFT checkpoint as a weaker teacher (teacher_weak, for the noisy
     pool). The student is SFT'd until it grounds a little, imprecisely, as base Qwen3-VL does;
  5. metrics.json: each model's test metrics, its query dependence on probe.jsonl (two-event clips asked for each
     event), and the bands the miniature is meant to meet, each measured and judged (bands). One event per clip:
     no design tried so far made a tiny model read the query (docs/LOG.md), so the query bands are not met.
"""
import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import dataclasses

import torch
from tqdm import tqdm

import data
import eval as ev
import rollout
from lib.miniature_clips import COLOURS, SHAPES, make_clips, make_noisy, make_probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIATURE = os.path.join(REPO, "miniature")  # the shipped build
REBUILD = "runs/toy"  # `python -m lib.miniature`'s default --out (runs/ is ignored by git)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# The official Qwen3-VL layout, without system prompt or thinking: a video renders as
# <|vision_start|><|video_pad|><|vision_end|>, which the processor expands into stamped frame groups.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclasses.dataclass
class ToyConfig:
    """Sizes of the miniature. `reduced()` is the seconds-long version the tests build."""
    seconds: int = 8          # clip length; answers are whole seconds in [0, seconds]
    src_fps: int = 4          # frames per second written to the mp4 (load_video samples 2 fps of them)
    frame: int = 32           # frame side in pixels: 32x32 = 2x2 patches -> 1 video token per frame pair
    shapes: int = 1           # shapes per clip (1-3; why 1 by default: docs/LOG.md)
    n_train: int = 2000
    n_test: int = 128
    n_val: int = 128          # validation clips (val.jsonl): SFT's stop and every tuning; never the test clips
    noisy_share: float = 0.2  # of train_noisy.jsonl's spans, the share replaced by a wrong one (see make_noisy)
    student: tuple = (80, 3, 64, 1)  # (text hidden, text layers, vision hidden, vision depth); why 80: docs/LOG.md
    teacher: tuple = (128, 4, 64, 1)  # 2.1x the student's weights (the paper's 32B teacher is 4x its 8B student)
    student_seed: int = 1     # its init; seed 7 never met its stop under transformers 5.25 (docs/LOG.md)
    student_steps: int = 1500  # at most: the student stops as soon as it grounds a little (see build)
    student_stop: float = 45.0  # validation mIoU, well above one constant answer's: it grounds a little (band 35-60)
    teacher_steps: int = 1200  # the cosine schedule's length (it stops earlier); why not 2,500: docs/LOG.md
    weak_teacher_stop: float = 70.0  # validation mIoU of the weaker teacher (teacher_weak), for the noisy pool
    sft_teacher_stop: float = 85.0  # of the SFT-only teacher (teacher_sft): below what GRPO gets out of the student
    teacher_stop: float = 92.0  # where the teacher's SFT ends and its GRPO starts (why: docs/LOG.md)
    grpo_steps: int = 500     # the teacher's GRPO with grpo.py; longer reached the ceiling (docs/LOG.md)
    grpo_lr: float = 1e-4     # grpo.py's miniature lr (3e-4 collapsed the SFT teacher: docs/LOG.md)
    probe_clips: int = 32     # two-event clips, each asked for both events: does a model read the query?
    batch: int = 16
    lr: float = 1.5e-3        # between an unstable 3e-3 and a slower 1e-3
    vision_lr_mult: float = 10.0  # the vision tower's lr multiplier (see sft)
    feedback_share: float = 0.0  # SFT prompts with a judge's feedback on a wrong answer, for VISD (off: docs/LOG.md)
    seed: int = 0

    @staticmethod
    def reduced():
        # 150 steps: enough for the answer format, so rollouts parse and earn rewards in the tests
        return ToyConfig(n_train=16, n_test=8, n_val=8, student_steps=150, teacher_steps=150, batch=4, grpo_steps=2,
                         probe_clips=4)


# ----------------------------------------------------------------------------- 2. tokenizer and processor
def make_processor(out, cfg):
    """Train a byte-level BPE on the miniature's text; wrap it with a real Qwen3VLProcessor; save to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
    corpus = [data.PROMPT.format(query=f"the {c} {s}") for c in COLOURS for s in SHAPES]
    corpus += [data.ANSWER.format(start=a / 2, end=b / 2) for a in range(0, 40) for b in range(0, 40, 3)]
    corpus += [f"<{t / 10:.1f} seconds>" for t in range(200)] + ["user", "assistant", "system"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token=None)
    n_pix = cfg.frame * cfg.frame
    video = Qwen3VLVideoProcessor(size={"shortest_edge": n_pix, "longest_edge": n_pix * 1024},
                                  cap_pixels_per_frame=False, do_sample_frames=False)
    # real Qwen3-VL's image settings (its preprocessor_config.json): patch 16, mean/std 0.5, like its video processor
    image = Qwen2VLImageProcessor(size={"shortest_edge": n_pix, "longest_edge": n_pix * 4}, patch_size=16,
                                  merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                 chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return processor


# ----------------------------------------------------------------------------- 3. models
def vision_token_ids(tok):
    """The config's ids of the vision special tokens, from the tokenizer: {image_token_id: ..., ...}."""
    return {k: tok.convert_tokens_to_ids(v) for k, v in (("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"))}


def make_model(processor, size, seed):
    """A random-init Qwen3VLForConditionalGeneration; size = (text hidden, text layers, vision hidden, depth)."""
    from transformers import AutoModelForImageTextToText, Qwen3VLConfig
    hidden, layers, v_hidden, depth = size
    tok = processor.tokenizer
    head_dim = 16
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
                         num_key_value_heads=hidden // head_dim, head_dim=head_dim, max_position_embeddings=4096,
                         pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=depth, hidden_size=v_hidden, intermediate_size=v_hidden * 2, num_heads=4,
                           patch_size=16, out_hidden_size=hidden, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        tie_word_embeddings=True, **vision_token_ids(tok))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


# ----------------------------------------------------------------------------- 4. SFT
def answer_labels(processor, batch):
    """Labels [B, L] for SFT: the answer tokens and the closing end-of-turn; -100 on prompt and padding."""
    tok = processor.tokenizer
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    header = len(tok("assistant\n", add_special_tokens=False)["input_ids"])
    labels = batch["input_ids"].clone()
    for row, ids in zip(labels, batch["input_ids"]):
        first = (ids == im_start).nonzero().max().item() + 1 + header
        row[:first] = -100
    labels[batch["attention_mask"] == 0] = -100
    return labels


def feedback_prompts(samples, seed):
    """Per sample, the judge's feedback (eval.judge) on a wrong answer, for an SFT prompt: 10% no span, else each
    boundary of the truth moved by -3..3 s. Why (ours): VISD's teacher reads feedback, as instruction-tuned models do;
    the miniature's student learns that here (the true answer is the target), so that its EMA teacher can."""
    rng = random.Random(seed + 1)
    out = []
    for s in samples:
        shift = lambda t: min(max(t + rng.randint(-3, 3), 0.0), s.duration or t + 3)
        wrong = "" if rng.random() < 0.1 else data.ANSWER.format(start=shift(s.span[0]), end=shift(s.span[1]))
        out.append(ev.judge(wrong, s)["feedback"])
    return out


def encode_each(processor, samples, videos, chunk=64, feedback=None):
    """SFT inputs (with labels) per sample, computed once: the processor costs about as much as a train step,
    so the training loop only pads and stacks these. feedback: per sample, a text for its prompt or None."""
    items = []
    feedback = feedback or [None] * len(samples)
    for i in range(0, len(samples), chunk):
        part = samples[i:i + chunk]
        b = data.encode(processor, part, videos[i:i + chunk], feedback=feedback[i:i + chunk],
                        answers=[data.ANSWER.format(start=s.span[0], end=s.span[1]) for s in part])
        b["labels"] = answer_labels(processor, b)
        pixels = b["pixel_values_videos"].split(b["video_grid_thw"].prod(1).tolist())
        for j, n in enumerate(b["attention_mask"].sum(1).tolist()):  # right-padded: the first n tokens are real
            items.append({k: b[k][j, :n] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels")}
                         | {"pixel_values_videos": pixels[j], "video_grid_thw": b["video_grid_thw"][j]})
    return items


def collate(items, pad_id):
    """encode_each items -> one right-padded batch, as data.encode(..., answers=...) + labels would give."""
    n = max(len(x["input_ids"]) for x in items)
    pad = lambda key, value: torch.stack([torch.nn.functional.pad(x[key], (0, n - len(x[key])), value=value)
                                          for x in items])
    return {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
            "mm_token_type_ids": pad("mm_token_type_ids", 0), "labels": pad("labels", -100),
            "pixel_values_videos": torch.cat([x["pixel_values_videos"] for x in items]),
            "video_grid_thw": torch.stack([x["video_grid_thw"] for x in items])}


def sft(model, processor, samples, videos, steps, cfg, desc, val=None, stop=None, eval_every=5, until=None,
        state=None, feedback_share=0.0):
    """Supervised fine-tuning on ground-truth answers (AdamW, cosine schedule over `steps`); a prompt carries a
    judge's feedback on a wrong answer (feedback_prompts) with probability `feedback_share`.

    val, stop: (samples, videos) and a predicate on eval metrics: training ends at the first evaluation where it holds.
    until: pause after this step; state: what a paused sft returned, to go on (dpo.py --pre-sft puts DPO in between).
    Returns (the last evaluation's metrics or None, steps taken, state: it keeps the encoded samples)."""
    if state is None:
        items = encode_each(processor, samples, videos)
        judged = encode_each(processor, samples, videos, feedback=feedback_prompts(samples, cfg.seed)) \
            if feedback_share else items
        # a higher lr for the vision tower: at init its outputs barely differ between frames (a constant-answer plateau)
        visual = [p for n, p in model.named_parameters() if ".visual." in n]
        rest = [p for n, p in model.named_parameters() if ".visual." not in n]
        opt = torch.optim.AdamW([{"params": rest, "lr": cfg.lr},
                                 {"params": visual, "lr": cfg.lr * cfg.vision_lr_mult}], betas=(0.9, 0.95),
                                weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        state = dict(opt=opt, sched=sched, rng=random.Random(cfg.seed), step=0, items=items, judged=judged)
    opt, sched, rng, items, judged = (state[k] for k in ("opt", "sched", "rng", "items", "judged"))
    metrics, step, threads = None, state["step"], torch.get_num_threads()
    # one thread (ours): the SFT is chaotic, the thread count changes the order of float sums (docs/LOG.md)
    torch.set_num_threads(1)
    bar = tqdm(range(step + 1, (until or steps) + 1), desc=f"{desc} (up to {steps} steps)" if stop else desc)
    for step in bar:
        model.train()
        idx = rng.sample(range(len(items)), cfg.batch)
        chosen = [judged[i] if feedback_share and rng.random() < feedback_share else items[i] for i in idx]
        batch = collate(chosen, processor.tokenizer.pad_token_id)  # no processor work per step
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if val is not None and (step % eval_every == 0 or step == steps):
            model.eval()
            metrics = toy_metrics(model, processor, *val)
            bar.write(f"{desc} step {step}: loss {loss.item():.3f} " + json.dumps(metrics))
            if stop is not None and stop(metrics):
                break
    model.eval()
    torch.set_num_threads(threads)
    state["step"] = step
    return metrics, step, state


def greedy_answers(model, processor, samples, videos, feedback=None):
    """The model's greedy answer to each sample (with `feedback`, one text per sample, in its prompt)."""
    rows, feedback = [], feedback or [None] * len(samples)
    for i in range(0, len(samples), 32):
        batch = data.encode(processor, samples[i:i + 32], videos[i:i + 32], feedback=feedback[i:i + 32])
        rows += rollout.decode(processor, *rollout.generate(model, processor, batch, 24))
    return rows


def toy_metrics(model, processor, samples, videos, feedback=None):
    """Greedy metrics + how many distinct answers the model gives (1 = it ignores the video) + % parseable."""
    rows = greedy_answers(model, processor, samples, videos, feedback)
    preds = [data.parse_span(a) for a in rows]
    m = ev.compute_metrics(preds, [s.span for s in samples])
    m["distinct"] = len(set(rows))
    m["parseable"] = 100.0 * sum(p is not None for p in preds) / len(preds)
    return {k: round(v, 1) for k, v in m.items()}


def query_dependence(model, processor, samples, videos):
    """On probe.jsonl's pairs (two events, one query each): the share of clips whose two greedy answers differ, and
    the mIoU against the queried event beside the mIoU against the clip's other event (equal: it ignores the query)."""
    rows = greedy_answers(model, processor, samples, videos)
    preds = [data.parse_span(a) for a in rows]
    other = [samples[i ^ 1].span for i in range(len(samples))]  # the pair's other event
    pairs = list(zip(rows[::2], rows[1::2]))
    return {"differ_%": round(100.0 * sum(a != b for a, b in pairs) / len(pairs), 1),
            "mIoU_queried": round(ev.compute_metrics(preds, [s.span for s in samples])["mIoU"], 1),
            "mIoU_other": round(ev.compute_metrics(preds, other)["mIoU"], 1)}


def reward_spread(model, processor, samples, videos, n=8):
    """Fraction of prompts whose n sampled answers (temperature 1) differ in IoU: GRPO needs such groups."""
    spread = 0
    for s, v in zip(samples, videos):
        ids, mask = rollout.generate(model, processor, data.encode(processor, [s] * n, [v] * n), 24, temperature=1.0)
        spread += len(set(ev.rollout_ious(processor, ids, mask, [s] * n))) > 1
    return round(100.0 * spread / len(samples), 1)


# ----------------------------------------------------------------------------- 5. the teacher's GRPO
def grpo_command(start, paths, cfg, run):
    """grpo.py's command line that post-trains the SFT'd teacher in `start` into the teacher, on the training clips,
    evaluated on the validation clips. The miniature's settings are spelled out: a build outside miniature/ would
    get the paper's."""
    return [sys.executable, os.path.join(REPO, "grpo.py"), "--student", start, "--data", paths["train"],
            "--eval-data", paths["val"], "--out", run, "--steps", str(cfg.grpo_steps), "--lr", str(cfg.grpo_lr),
            "--prompts-per-step", "2", "--micro-batch", "2", "--group-size", "8", "--schedule", "constant",
            "--warmup-steps", "5", "--weight-decay", "0", "--temperature", "1.0", "--max-new-tokens", "24",
            "--eval-every", str(max(1, cfg.grpo_steps // 15)), "--save-every", str(cfg.grpo_steps),
            "--num-workers", "0", "--seed", str(cfg.seed)]


def grpo_teacher(start, paths, cfg):
    """The teacher made the paper's way (official code: a Qwen3-VL-32B post-trained with GRPO): grpo.py on the SFT'd
    teacher in `start`, on one thread as the SFT (a chaotic run: the thread count would decide it). Its log is kept."""
    run = f"{paths['teacher']}-grpo-run"
    command = grpo_command(start, paths, cfg, run)
    print("python " + " ".join(os.path.relpath(c) if os.sep in c else c for c in command[1:]))
    subprocess.run(command, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    shutil.copytree(f"{run}/final", paths["teacher"])
    shutil.copy(f"{run}/log.jsonl", paths["teacher_grpo_log"])
    shutil.rmtree(run)


# ----------------------------------------------------------------------------- 6. the bands
def bands(report):
    """What the miniature is meant to be, measured: [{what, value, ok}]. Reported, never tuned to a winner."""
    s, t, q = report["student"], report["teacher"], report["teacher"]["query"]
    rows = [("student test mIoU in 35-60", s["mIoU"], 35 <= s["mIoU"] <= 60),
            ("student distinct greedy answers >= 10", s["distinct"], s["distinct"] >= 10),
            ("student sampled answers differ in IoU (% of prompts) > 0", s["sampled_reward_spread_%"],
             s["sampled_reward_spread_%"] > 0),
            ("teacher below the ceiling: test mIoU < 97", t["mIoU"], t["mIoU"] < 97),
            ("teacher has >= 2x the student's weights", round(t["params"] / s["params"], 2),
             t["params"] >= 2 * s["params"]),
            ("teacher's greedy answers differ between a clip's queries: >= 80% of clips", q["differ_%"],
             q["differ_%"] >= 80),
            ("teacher mIoU on the queried event - on the other event >= 25",
             round(q["mIoU_queried"] - q["mIoU_other"], 1), q["mIoU_queried"] - q["mIoU_other"] >= 25)]
    return [{"what": w, "value": v, "ok": bool(ok)} for w, v, ok in rows]


# ----------------------------------------------------------------------------- build
def miniature_paths(out):
    """Where build puts each part of the miniature under `out`."""
    return {"student": f"{out}/student", "teacher": f"{out}/teacher", "teacher_sft": f"{out}/teacher_sft",
            "teacher_weak": f"{out}/teacher_weak", "teacher_grpo_log": f"{out}/teacher_grpo_log.jsonl",
            "train": f"{out}/train.jsonl", "train_noisy": f"{out}/train_noisy.jsonl", "val": f"{out}/val.jsonl",
            "test": f"{out}/test.jsonl", "probe": f"{out}/probe.jsonl", "metrics": f"{out}/metrics.json"}


def sft_splits(paths, cfg, names=("train", "val", "test")):
    """The named splits decoded, each (samples, videos): (fit, val, test) by default; val decides when SFT stops."""
    splits = [data.load_annotations(paths[k]) for k in names]
    return [(s, [data.load_video(x.video) for x in tqdm(s, desc="decode clips")]) for s in splits]


def measure(path, processor, test, probe):
    """metrics.json's row of a saved model (test, probe: (samples, videos)): greedy metrics, weights, spread, query."""
    model, _ = rollout.load_model(path)
    row = toy_metrics(model, processor, *test)
    row["params"] = sum(p.numel() for p in model.parameters())
    row["sampled_reward_spread_%"] = reward_spread(model, processor, test[0][:16], test[1][:16])
    row["query"] = query_dependence(model, processor, *probe)
    return row


def make_teachers(processor, fit, val, paths, cfg, start):
    """One SFT run, saved at its first validation mIoU >= each stop (looked at often: it jumps): a weaker teacher
    (ours, for TVDF and off-policy), the SFT-only teacher, then `start`, which GRPO post-trains into the teacher.
    Returns the SFT steps of each."""
    teacher = make_model(processor, cfg.teacher, cfg.seed + len("teacher"))
    state, steps = None, {}
    for path, target in ((paths["teacher_weak"], cfg.weak_teacher_stop), (paths["teacher_sft"], cfg.sft_teacher_stop),
                         (start, cfg.teacher_stop)):
        _, steps[os.path.basename(path)], state = sft(teacher, processor, *fit, cfg.teacher_steps, cfg, "SFT teacher",
                                                      val=val, stop=lambda m: m["mIoU"] >= target, state=state)
        teacher.save_pretrained(path)
        processor.save_pretrained(path)
    grpo_teacher(start, paths, cfg)
    return steps


def build(out=REBUILD, cfg=None):
    """Build everything under `out` (module docstring), then its MANIFEST.json; returns the paths (cached)."""
    cfg = cfg or ToyConfig()
    paths = miniature_paths(out)
    if os.path.exists(paths["metrics"]):
        return paths
    t0 = time.time()
    make_clips(out, cfg)
    make_noisy(out, cfg)
    make_probe(out, cfg)
    processor = make_processor(f"{out}/processor", cfg)
    fit, val, test, probe = sft_splits(paths, cfg, ("train", "val", "test", "probe"))
    start = f"{out}/teacher-start"  # the teacher's GRPO start: measured, not shipped
    report = {"teacher_sft_steps": make_teachers(processor, fit, val, paths, cfg, start)}
    for name, path in (("teacher_weak", paths["teacher_weak"]), ("teacher_sft", paths["teacher_sft"]),
                       ("teacher_start", start), ("teacher", paths["teacher"])):
        report[name] = measure(path, processor, test, probe)
    shutil.rmtree(start)
    # the student stops once it grounds a little, imprecisely, as base Qwen3-VL does (it jumps: look often)
    student = make_model(processor, cfg.student, cfg.student_seed)
    _, report["student_sft_steps"], _ = sft(student, processor, *fit, cfg.student_steps, cfg, "SFT student", val=val,
                                            stop=lambda m: m["mIoU"] >= cfg.student_stop,
                                            eval_every=5, feedback_share=cfg.feedback_share)
    student.save_pretrained(paths["student"])
    processor.save_pretrained(paths["student"])
    report["student"] = measure(paths["student"], processor, test, probe)
    if report["student_sft_steps"] == cfg.student_steps:  # a knife-edge (docs/LOG.md): say so
        print("warning: the student never met its stop: this is not the miniature docs/results.md's numbers come from")
    # can it read VISD's feedback? greedy mIoU with the judge's verdict on its own greedy answer in the prompt
    verdicts = [ev.judge(a, s)["feedback"] for a, s in zip(greedy_answers(student, processor, *test), test[0])]
    report["student"]["mIoU_with_feedback"] = toy_metrics(student, processor, *test, verdicts)["mIoU"]
    report["bands"] = bands(report)
    report["build_seconds"] = round(time.time() - t0, 1)
    report["config"] = dataclasses.asdict(cfg)  # what built it (dpo.py --pre-sft rebuilds the student's SFT)
    with open(paths["metrics"], "w") as f:
        json.dump(report, f, indent=1)
    write_manifest(out)
    print(json.dumps(report, indent=1))
    return paths


# ----------------------------------------------------------------------------- shipping it
BUILT_WITH = ("torch", "torchvision", "transformers", "tokenizers", "av", "decord", "numpy")


def write_manifest(out):
    """MANIFEST.json beside the build: a sha256 per file, and what built them (library versions, Python, CPU)."""
    import hashlib
    import platform
    from importlib.metadata import version
    names = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
                   if f != "MANIFEST.json")
    digest = {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest() for n in names}
    cpu = [line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")][:1]
    manifest = {"built_with": {n: version(n) for n in BUILT_WITH} | {"python": platform.python_version()},
                "machine": f"{cpu[0] if cpu else platform.machine()}, {os.cpu_count()} cores", "sha256": digest}
    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=REBUILD, help="where the miniature is rebuilt (the shipped one is miniature/)")
    p.add_argument("--reduced", action="store_true", help="the seconds-long build the tests use")
    a = p.parse_args()
    print(f"rebuilding in {a.out}; miniature/ stays as shipped (other versions or CPUs can give another miniature)")
    data.run(lambda: build(a.out, ToyConfig.reduced() if a.reduced else ToyConfig()))
