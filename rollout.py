"""The policy's input and output: loading a model, sampling its completions, and the log-probs of those tokens.

    model, processor = rollout.load_model("Qwen/Qwen3-VL-2B-Instruct")      # or a local folder (the miniature's)
    ids, mask = rollout.generate(model, processor, batch, temperature=1.0)  # sample: completions [B, T]
    seq = rollout.append_completion(batch, ids, mask)                       # prompt + completion [B, L + T]
    logp = rollout.token_logp(rollout.completion_logits(model, seq, T, 1.0, forbidden), ids)  # score: [B, T]

Every method samples and scores through these (opd.train, and each variant's `score`). Sampling and scoring are one
distribution: the same temperature, the same support (vision tokens forbidden in both), nothing else on the logits.
`reprompt` puts the same tokens behind another prompt. A batch of G rollouts a prompt from lib/share.py (`share`)
takes one branch in generate and completion_logits: its video and prompt computed once, the same numbers.
"""
import contextlib
import os
import re

import torch
from transformers import BatchFeature, GenerationConfig

import data
from lib import fsdp, share


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


# ----------------------------------------------------------------------------- sampling
def generate(model, processor, batch, max_new_tokens=32, temperature=None, features=None):
    """Greedy (temperature None) or pure sampling at `temperature` (top_k 0, top_p 1) with the KV cache.

    batch: left-padded inputs from data.encode (or lib/share.py's `share`), [B, L]; features: this model's
    share.video_features of a `share` batch (computed there if not given). Vision tokens are suppressed.
    Returns completion ids [B, T] (padded after EOS) and their mask [B, T] (1 up to and including EOS).
    """
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id  # where an answer ends is the checkpoint's to say; how to sample, not
    eos = sorted(set(eos if isinstance(eos, list) else [eos]))
    config = GenerationConfig(max_new_tokens=max_new_tokens, suppress_tokens=forbidden_ids(processor),
                              eos_token_id=eos, pad_token_id=tok.pad_token_id, **(
                                  dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature
                                  else dict(do_sample=False)))
    batch = batch.to(model.device)
    with sampling(model, config):
        inputs, cache = batch, None
        if "video_group" in batch:  # ours, same numbers: a group's video and prompt once (lib/share.py)
            inputs, cache = share.generation_inputs(model, batch, features)
        # FSDP2: generate runs the vision tower outside the model's forward (gathered); synced_gpus: every rank
        # runs the same number of forward passes, so a rank whose answers are done keeps stepping until all are
        with fsdp.gathered(model):
            out = model.generate(**inputs, cache=cache, generation_config=config, synced_gpus=fsdp.world() > 1)
    ids = out[:, inputs["input_ids"].shape[1]:]
    mask = completion_mask(ids, eos)
    return ids.masked_fill(mask == 0, tok.pad_token_id), mask


@contextlib.contextmanager
def sampling(model, config):
    """Inside: the model in eval mode, generating with `config` alone, without gradients.

    Sampling and scoring must be one distribution (completion_logits scores logits / temperature over the same
    support), so nothing else may touch the logits. Eval mode: in train mode, gradient checkpointing makes
    transformers drop the KV cache and the model writes garbage. `config` alone: generate fills every setting left
    unset from model.generation_config, and a checkpoint's own generation_config.json (real Qwen checkpoints ship
    top_k, top_p, temperature, some a repetition penalty) would otherwise do so.
    """
    was_training, saved = model.training, model.generation_config
    model.eval()
    model.generation_config = config
    try:
        with torch.no_grad():
            yield
    finally:
        model.generation_config = saved
        model.train(was_training)


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
        prompt = share.share(data.encode(processor, samples, videos), group)
    else:  # each completion its own prompt: left padding keeps every prompt's end next to its completion
        prompt = data.encode(processor, [s for s in samples for _ in range(group)],
                             [v for v in videos for _ in range(group)], feedback=feedback)
    return append_completion(prompt.to(ids.device), ids, mask)


def completion_logits(model, seq, T, temperature, forbidden, vocab=None, features=None):
    """Logits / temperature of the T completion positions only: [B, T, V] in fp32.

    `logits_to_keep` makes the LM head run on the last T + 1 positions, so the [B, L, V] logits of a long video
    prompt never exist. Forbidden (vision) tokens get -inf: the support is the one sampling used. `vocab` slices
    a teacher whose embedding is padded larger than the student's (Qwen2.5-VL-3B 151,936 vs 7B 152,064 rows).
    features: this model's share.video_features of a `share` seq (kept or computed there if not given).
    """
    if "video_group" in seq:  # ours, same numbers: a group's video and prompt once (lib/share.py)
        logits = share.logits(model, seq, T, features)
    else:
        logits = model(**seq, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
    logits = logits[..., :vocab] if vocab else logits
    blocked = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    blocked[forbidden] = True
    # in fp32, as generate samples: a bf16 model's logits / T rounded in bf16 would be another distribution
    return (logits.float() / temperature).masked_fill(blocked, float("-inf"))


def token_logp(logits, ids):
    """log pi(a_t) of the chosen tokens: logits [B, T, V], ids [B, T] -> [B, T] in fp32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
