"""The policy's input and output: loading a model, sampling its completions, and the log-probs of those tokens.

    model, processor = rollout.load_model("Qwen/Qwen3-VL-2B-Instruct")      # or a local folder (the miniature's)
    ids, mask = rollout.generate(model, processor, batch, temperature=1.0)  # sample: completions [B, T]
    seq = rollout.append_completion(batch, ids, mask)                       # prompt + completion [B, L + T]
    logp = rollout.token_logp(rollout.completion_logits(model, seq, T, 1.0, forbidden), ids)  # score: [B, T]

Every method samples and scores through these (opd.train, and each variant's `score`). Sampling and scoring are one
distribution: the same temperature, the same support (vision tokens forbidden in both), nothing else on the logits.
`share` (or `expand`, a copy each) puts G rollouts of one prompt into one batch, `reprompt` the same tokens behind
another prompt. What a `share` batch computes once: each video's vision tower output per model and step
(video_features), and, for G > 1, the prompt in the scoring and training forwards (grouped_logits).
"""
import copy
import os
import re

import torch
from transformers import BatchFeature, GenerationConfig

import data


# ----------------------------------------------------------------------------- models
def load_model(name_or_path, device=None, dtype=None):
    """A hub id or a local folder -> (model, processor). bf16 on a machine with a GPU (also when loaded on CPU for
    FSDP to shard onto the GPUs: a frozen teacher needs no fp32 copy), fp32 without one."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    return model, processor


def check_model(flag, name):
    """A model is an existing folder holding config.json or a hub id ("org/name"); else a DataError saying which
    (before anything loads: from_pretrained's own error for a missing folder is about hub ids)."""
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise data.DataError(f"--{flag} {name}: the folder holds no config.json (not a saved model)")
    elif os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise data.DataError(f"--{flag} {name}: no such model folder" + (
            "" if name.count("/") == 1 else " (and not a hub id of the form org/name)"))
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise data.DataError(f"--{flag} {name}: not a hub id (org/name of letters, digits, '-', '_', '.')")


def forbidden_ids(processor):
    """Vision special tokens: never sampled (a sampled <|video_pad|> breaks re-scoring) and so never scored."""
    tok = processor.tokenizer
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    ids = [tok.convert_tokens_to_ids(n) for n in names]
    return sorted({i for i in ids if i is not None and i != tok.unk_token_id})


# ----------------------------------------------------------------------------- a prompt's rollouts and its video
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


def share(batch, n):
    """Like expand, but the n rollouts of a prompt share its video: the text is repeated (B*n rows), the video's
    patches are not. Such a batch runs each vision tower once per video (forward_inputs), not n times.

    batch: data.encode's [B, L]. Returns input_ids, attention_mask, mm_token_type_ids [B*n, L], video_grid_thw
    [B*n, 3] (the positions of every row need it), pixel_values_videos of the B videos once, and video_group n.
    """
    out = {k: v.repeat_interleave(n, 0) for k, v in batch.items() if k != "pixel_values_videos"}
    out["pixel_values_videos"] = batch["pixel_values_videos"]
    out["video_group"] = n
    return BatchFeature(out)


def video_features(model, batch):
    """The vision tower's output for each video of a `share` batch, computed once without a gradient and repeated
    for each of its rollouts: transformers' own precomputed input (`mm_encoder_outputs`) in place of the pixels.

    Returns the tower's output, pooler_output (and Qwen3-VL's deepstack_features) as tuples of B*n per-video tensors,
    in expand's order. The numbers are the ones the forward computes from expand's copies (the same tower on the
    same patches), so are the logits and, for a frozen tower, the gradients (tests/test_opd.py).
    """
    group = batch["video_group"]
    if hasattr(model, "unshard"):  # FSDP2: as in generate, the tower runs outside the model's forward
        model.unshard()
    with torch.no_grad():
        out = model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"][::group],
                                       return_dict=True)
    if hasattr(model, "reshard"):
        model.reshard()
    copies = lambda per_video: tuple(v for v in per_video for _ in range(group))
    out.pooler_output = copies(out.pooler_output)
    if getattr(out, "deepstack_features", None) is not None:
        out.deepstack_features = [copies(layer) for layer in out.deepstack_features]
    out.last_hidden_state = None  # the forward reads only the above: free the tower's pre-merger states
    return out


def vision_frozen(model):
    """Whether no weight of the model's vision tower trains."""
    return not any(p.requires_grad for p in model.model.visual.parameters())


def forward_inputs(model, batch, features=None):
    """What the model's forward (and generate) take for `batch`. A `share` batch gets its videos as features: the
    ones given (video_features of this model), or computed here once per video. A trainable tower under autograd
    gets expand's copies of the patches instead, today's path: the gradient then flows through the tower as usual.
    Any other batch is passed as it is."""
    if "video_group" not in batch:
        return batch
    inputs = BatchFeature({k: v for k, v in batch.items() if k != "video_group"})
    if features is None and torch.is_grad_enabled() and not vision_frozen(model):
        group, grid = batch["video_group"], batch["video_grid_thw"]
        patches = inputs["pixel_values_videos"].split(grid[::group].prod(-1).tolist())
        inputs["pixel_values_videos"] = torch.cat([p for p in patches for _ in range(group)])
        return inputs
    if features is None:
        features = video_features(model, batch)
    del inputs["pixel_values_videos"]
    inputs["mm_encoder_outputs"] = {"video": features}
    return inputs


# ----------------------------------------------------------------------------- a group's prompt, once
def packs(model, seq):
    """Whether completion_logits runs `seq` as grouped_logits' packed rows: a `share` seq with G > 1 rollouts a
    prompt, on Qwen3-VL (its mrope positions are built here) with an attention that takes a 4D mask."""
    return (seq.get("video_group", 1) > 1 and model.config.model_type == "qwen3_vl"
            and model.config._attn_implementation in ("sdpa", "eager"))


def group_attention(prompt_mask, completion_mask, dtype):
    """Who attends to whom in packed rows [prompt, c_1, ..., c_G]: a prompt token to the prompt before it, a
    completion token to the prompt and to its own completion's earlier tokens, never to another completion; pad
    tokens are seen by no one (each still sees itself, so no attention row is empty).

    prompt_mask [B, L], completion_mask [B, G, T] (1 = a real token) -> [B, 1, N, N], N = L + G*T: bool for sdpa,
    or 0 / -inf to add for eager (dtype given)."""
    B, G, T = completion_mask.shape
    n = prompt_mask.shape[1] + G * T
    block = torch.cat([torch.zeros(prompt_mask.shape[1], dtype=torch.long),  # 0: the prompt, g: completion g
                       torch.arange(1, G + 1).repeat_interleave(T)]).to(prompt_mask.device)
    pos = torch.arange(n, device=prompt_mask.device)
    allowed = (pos[:, None] >= pos[None, :]) & ((block[None, :] == 0) | (block[:, None] == block[None, :]))
    real = torch.cat([prompt_mask, completion_mask.flatten(1)], 1).bool()  # [B, N]
    allowed = (allowed[None] & real[:, None, :]) | torch.eye(n, dtype=torch.bool, device=pos.device)
    if dtype is None:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=pos.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def grouped_logits(model, seq, T, features=None):
    """The logits of a `share` seq's completions from one forward over B packed rows [prompt, c_1, ..., c_G] in
    place of B*G rows [prompt, c_g]: the prompt's tokens (8k of them for a 35 s clip) once per group, with its
    gradient, not G times (the idea of Prefix Grouper, arXiv 2506.05433).

    seq: [B*G, L+T] (append_completion of a `share` batch); features: video_features of this model (repeated per
    rollout, as generate takes them) or None (the tower runs in the forward, once per video). -> [B*G, T, V].
    Why the numbers are the same: completion g's tokens attend to exactly the keys they have in row [prompt, c_g]
    (group_attention), at the mrope positions they have there (get_rope_index of seq itself), and the prompt's
    keys do not depend on what follows them; the loss sums the same per-token terms, so the gradient is the sum
    of the G rows' gradients (tests/test_opd.py checks both to float tolerance).
    """
    G = seq["video_group"]
    B, L = seq["input_ids"].shape[0] // G, seq["input_ids"].shape[1] - T
    rows = lambda x: x.view(B, G, *x.shape[1:])
    ids, mask = rows(seq["input_ids"]), rows(seq["attention_mask"])
    positions, _ = model.model.get_rope_index(seq["input_ids"], seq["mm_token_type_ids"],
                                              video_grid_thw=seq["video_grid_thw"],
                                              attention_mask=seq["attention_mask"])  # [3, B*G, L+T]
    positions = positions.view(3, B, G, L + T)
    inputs = {
        "input_ids": torch.cat([ids[:, 0, :L], ids[:, :, L:].flatten(1)], 1),  # [B, L + G*T]
        "attention_mask": group_attention(mask[:, 0, :L], mask[:, :, L:], None if
                                          model.config._attn_implementation == "sdpa" else model.dtype),
        "position_ids": torch.cat([positions[:, :, 0, :L], positions[:, :, :, L:].flatten(2)], 2),
        "mm_token_type_ids": torch.cat([rows(seq["mm_token_type_ids"])[:, 0, :L],
                                        torch.zeros_like(ids[:, :, L:].flatten(1))], 1),
        "video_grid_thw": seq["video_grid_thw"][::G]}
    if features is None:
        inputs["pixel_values_videos"] = seq["pixel_values_videos"]  # each video once, as each packed row holds it
    else:
        inputs["mm_encoder_outputs"] = {"video": once(features, G)}
    logits = model(**inputs, logits_to_keep=1 + G * T, use_cache=False).logits  # the prompt's last + completions
    first = logits[:, :1].unsqueeze(1).expand(-1, G, -1, -1)  # the prompt's last token predicts each c_g[0]
    rest = logits[:, 1:].view(B, G, T, -1)[:, :, :-1]         # c_g[t] predicts c_g[t + 1]
    return torch.cat([first, rest], 2).flatten(0, 1)


def prefilled(model, batch, features=None):
    """The KV cache of a `share` batch's prompts but their last token, computed once per prompt (B rows) and
    repeated for its G rollouts: generate then starts from it and runs only the last prompt token and the answer
    for each rollout, in place of G prefills of the same prompt. The positions the model keeps for generation
    (rope_deltas) are repeated with it. The numbers are the plain prefill's: each row's keys and values depend on
    that row's tokens only."""
    G = batch["video_group"]
    prefix = {"input_ids": batch["input_ids"][::G, :-1], "attention_mask": batch["attention_mask"][::G, :-1],
              "mm_token_type_ids": batch["mm_token_type_ids"][::G, :-1], "video_grid_thw": batch["video_grid_thw"][::G]}
    if features is None:
        prefix["pixel_values_videos"] = batch["pixel_values_videos"]
    else:
        prefix["mm_encoder_outputs"] = {"video": once(features, G)}
    with torch.no_grad():
        cache = model(**prefix, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(G)
    model.model.rope_deltas = model.model.rope_deltas.repeat_interleave(G, 0)
    return cache


def once(features, group):
    """video_features' per-rollout output (B*G entries) -> a copy holding each video's entry once (B)."""
    out = copy.copy(features)
    out.pooler_output = features.pooler_output[::group]
    if getattr(features, "deepstack_features", None) is not None:
        out.deepstack_features = [layer[::group] for layer in features.deepstack_features]
    return out


# ----------------------------------------------------------------------------- sampling
def generate(model, processor, batch, max_new_tokens=32, temperature=None, features=None):
    """Greedy (temperature None) or pure sampling at `temperature` (top_k 0, top_p 1) with the KV cache.

    batch: left-padded inputs from data.encode (or `share`), [B, L]; features: this model's video_features of a
    `share` batch (computed here if not given). Vision tokens are suppressed.
    Returns completion ids [B, T] (padded after EOS) and their mask [B, T] (1 up to and including EOS).

    Sampling and scoring must be one distribution (completion_logits scores logits / temperature over the same
    support), so nothing else may touch the logits: the model generates in eval mode (in train mode, gradient
    checkpointing makes transformers drop the KV cache and the model writes garbage), and from a fresh
    GenerationConfig holding only the settings below. A checkpoint's own generation_config.json (real Qwen
    checkpoints ship top_k, top_p, temperature, some a repetition penalty) would otherwise fill in every setting
    left unset here.
    """
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id  # where an answer ends is the checkpoint's to say; how to sample, not
    eos = sorted(set(eos if isinstance(eos, list) else [eos]))
    config = GenerationConfig(max_new_tokens=max_new_tokens, suppress_tokens=forbidden_ids(processor),
                              eos_token_id=eos, pad_token_id=tok.pad_token_id, **(
                                  dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature
                                  else dict(do_sample=False)))
    batch = batch.to(model.device)
    shared = packs(model, batch)  # a group's prompt once: generate starts from its prefilled cache
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")} if shared else \
        forward_inputs(model, batch, features)
    was_training, saved = model.training, model.generation_config
    model.eval()
    model.generation_config = config  # generate fills unset values from model.generation_config: make it ours
    if hasattr(model, "unshard"):  # FSDP2 (torchrun): generate runs the vision tower outside the model's forward,
        model.unshard()            # so gather the top-level weights first
    try:
        with torch.no_grad():
            # synced_gpus: under torchrun + FSDP every rank must run the same number of forward passes, so a rank
            # whose answers are done keeps stepping until all are
            cache = prefilled(model, batch, features) if shared else None
            out = model.generate(**inputs, cache=cache, generation_config=config,
                                 synced_gpus=torch.distributed.is_initialized())
    finally:
        model.generation_config = saved
        model.train(was_training)
    if hasattr(model, "reshard"):
        model.reshard()
    ids = out[:, inputs["input_ids"].shape[1]:]
    mask = completion_mask(ids, eos)
    return ids.masked_fill(mask == 0, tok.pad_token_id), mask


def completion_mask(ids, eos_ids):
    """[B, T] -> 1 up to and including the first EOS, 0 after. Found by position, not by token, so the EOS
    stays in the loss even when pad == eos (trl PR #6357)."""
    is_eos = torch.isin(ids, torch.tensor(sorted(eos_ids), device=ids.device)).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def decode(processor, ids, mask):
    """Completion ids [B, T] -> answer strings (special tokens dropped)."""
    return [processor.tokenizer.decode(i[m.bool()], skip_special_tokens=True) for i, m in zip(ids, mask)]


# ----------------------------------------------------------------------------- scoring the same tokens
def append_completion(batch, ids, mask):
    """Prompt batch [B, L] + completion ids/mask [B, T] -> one batch [B, L + T] for scoring (completion = text)."""
    seq = dict(batch)
    seq["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    seq["attention_mask"] = torch.cat([batch["attention_mask"], mask], 1)
    seq["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    return BatchFeature(seq)


def reprompt(processor, samples, videos, ids, mask, feedback=None):
    """The same completions ids, mask [B*G, T] behind a prompt built anew from B samples and their videos (G
    copies each): how VA-OPD's degraded video and VISD's judged prompt score the rollout's own tokens.
    feedback: one text per completion [B*G] (VISD's judge on that completion), added to its own prompt."""
    group = ids.shape[0] // len(samples)
    if feedback is None:
        prompt = share(data.encode(processor, samples, videos), group)
    else:  # each completion its own prompt: left padding keeps every prompt's end next to its completion
        prompt = data.encode(processor, [s for s in samples for _ in range(group)],
                             [v for v in videos for _ in range(group)], feedback=feedback)
    return append_completion(prompt.to(ids.device), ids, mask)


def completion_logits(model, seq, T, temperature, forbidden, vocab=None, features=None):
    """Logits / temperature of the T completion positions only: [B, T, V].

    `logits_to_keep` makes the LM head run on the last T + 1 positions, so the [B, L, V] logits of a long video
    prompt never exist. Forbidden (vision) tokens get -inf: the support is the one sampling used. `vocab` slices
    a teacher whose embedding is padded larger than the student's (Qwen2.5-VL-3B 151,936 vs 7B 152,064 rows).
    features: this model's video_features of a `share` seq (computed here if not given; see forward_inputs).
    """
    if packs(model, seq):  # a group of rollouts: its prompt once
        logits = grouped_logits(model, seq, T, features)
    else:
        logits = model(**forward_inputs(model, seq, features), logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
    logits = logits[..., :vocab] if vocab else logits
    blocked = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    blocked[forbidden] = True
    return (logits / temperature).masked_fill(blocked, float("-inf"))


def token_logp(logits, ids):
    """log pi(a_t) of the chosen tokens: logits [B, T, V], ids [B, T] -> [B, T] in fp32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
