"""Speed-ups with the same numbers: a group's video and prompt computed once (ours).

    batch = share.share(data.encode(processor, samples, videos), G)   # G rollouts a prompt, the video once
    rollout.generate(model, processor, batch, ...)                    # -> generation_inputs: the prompt prefilled once
    rollout.completion_logits(model, seq, T, ...)                     # -> logits: the prompt once per forward

rollout.generate and rollout.completion_logits take this path in one branch each, when a batch comes from `share`;
`expand` (a copy per rollout, --no-share-prompt) is the plain path they are checked against (tests/test_opd.py).
What a `share` batch computes once: each video's vision tower output per model and step (video_features, kept in
the batch for the model that trains), and, for G > 1, the prompt in the scoring and training forwards
(grouped_logits) and in generation (prefilled).
"""
import copy

import torch
from transformers import BatchFeature

from lib import fsdp

FEATURES = "video_features"  # a `share` batch's key: {model: video_features} of the model that trains


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
    out[FEATURES] = {}  # filled by generation_inputs, read by the same step's training forward (kept)
    return BatchFeature(out)


def video_features(model, batch):
    """The vision tower's output for each video of a `share` batch, computed once without a gradient and repeated
    for each of its rollouts: transformers' own precomputed input (`mm_encoder_outputs`) in place of the pixels.

    Returns the tower's output, pooler_output (and Qwen3-VL's deepstack_features) as tuples of B*n per-video tensors,
    in expand's order. The numbers are the ones the forward computes from expand's copies (the same tower on the
    same patches), so are the logits and, for a frozen tower, the gradients (tests/test_opd.py).
    """
    group = batch["video_group"]
    with torch.no_grad(), fsdp.gathered(model):  # the tower runs outside the model's forward
        out = model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"][::group],
                                       return_dict=True)
    copies = lambda per_video: tuple(v for v in per_video for _ in range(group))
    out.pooler_output = copies(out.pooler_output)
    if getattr(out, "deepstack_features", None) is not None:
        out.deepstack_features = [copies(layer) for layer in out.deepstack_features]
    out.last_hidden_state = None  # the forward reads only the above: free the tower's pre-merger states
    return out


def vision_frozen(model):
    """Whether no weight of the model's vision tower trains."""
    return not any(p.requires_grad for p in model.model.visual.parameters())


def kept(model, batch, features=None):
    """The video features `model` runs `batch` with: the ones given, else the ones generation_inputs kept in the
    batch for it, else None (computed where they are needed)."""
    return features if features is not None else batch.get(FEATURES, {}).get(model)


def forward_inputs(model, batch, features=None):
    """What the model's forward (and generate) take for `batch`. A `share` batch gets its videos as features: the
    ones given (video_features of this model), or computed here once per video. A trainable tower under autograd
    gets expand's copies of the patches instead, today's path: the gradient then flows through the tower as usual.
    Any other batch is passed as it is."""
    if "video_group" not in batch:
        return batch
    inputs = BatchFeature({k: v for k, v in batch.items() if k not in ("video_group", FEATURES)})
    features = kept(model, batch, features)
    if features is None and torch.is_grad_enabled() and not vision_frozen(model):
        group, grid = batch["video_group"], batch["video_grid_thw"]
        patches = inputs["pixel_values_videos"].split(grid[::group].prod(-1).tolist())
        inputs["pixel_values_videos"] = torch.cat([p for p in patches for _ in range(group)])
        return inputs
    if features is None:
        features = video_features(model, batch)
    inputs.pop("pixel_values_videos", None)  # lean may have dropped them already
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




def lean(seq, model):
    """seq without its video patches when `model`'s training forward will not read them: the features generate kept
    for it stand in (a frozen tower). They would otherwise stay on the GPU with the step's rollouts until the
    update."""
    if kept(model, seq) is None:
        return seq
    return BatchFeature({k: v for k, v in seq.items() if k != "pixel_values_videos"})


# ----------------------------------------------------------------------------- rollout.py's two branches
def generation_inputs(model, batch, features=None):
    """What rollout.generate passes to model.generate for a `share` batch -> (inputs, cache). G > 1 on Qwen3-VL:
    the text only, and the KV cache of each prompt prefilled once (prefilled); else forward_inputs (each video's
    features once). A model that trains with a frozen tower keeps its features in the batch (FEATURES): its training
    forward on these rollouts reuses them (kept). Runs in eval mode (rollout.generate's context)."""
    features = kept(model, batch, features)
    if features is None and any(p.requires_grad for p in model.parameters()) and vision_frozen(model):
        features = batch[FEATURES][model] = video_features(model, batch)
    if packs(model, batch):
        text = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        return text, prefilled(model, batch, features)
    return forward_inputs(model, batch, features), None


def logits(model, seq, T, features=None):
    """rollout.completion_logits' forward for a `share` seq -> [B*G, T, V]: grouped_logits (a group's prompt once)
    where it packs, else one row per rollout with each video's features once (forward_inputs)."""
    if packs(model, seq):
        return grouped_logits(model, seq, T, kept(model, seq, features))
    return model(**forward_inputs(model, seq, features), logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
