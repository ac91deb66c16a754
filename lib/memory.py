"""What a run will hold on each device, said before a model loads, and a refusal when a GPU has less free.

    parts = memory.estimate(args, frozen=[args.teacher], group=1)   # {part: bytes} per device, and "peak"
    memory.check(args, frozen=[args.teacher], group=1)               # cli.start_run: one line; refuse if too big

Counted, not measured: the parameters of each model (built from its config on the meta device: no weight is read),
the longest training prompt (the videos ranked by their headers, the largest encoded: its tokens and video
patches), the step's layout (opd.collect keeps every rollout of the step, with its video, until opd.update has
used them) and per-token activation sizes of one Qwen3 decoder layer (ACTIVATION). docs/results.md, "Memory per GPU",
compares the estimate with measured peaks (tests/bench_real_dims.py); tests/test_memory.py checks it against
measured steps at reduced widths.
"""
import torch

import data
from lib import fsdp

GB = 2 ** 30  # GiB, as torch.cuda reports memory
# Bytes one decoder layer keeps for backward per token (4 coefficients: of intermediate_size I, of the query width
# heads*head_dim, of the key/value width kv_heads*head_dim, of hidden_size H), fp32 and under bf16 autocast.
# Measured with torch.autograd.graph.saved_tensors_hooks on Qwen3-VL text layers of several widths (a fit that is
# exact to ~300 bytes a token); the vision tower's layers are counted with the same sizes (an approximation).
ACTIVATION = {False: (16, 16, 16, 26), True: (8, 10, 10, 28)}


def model_size(path):
    """A model's sizes from its config alone -> dict(config, params, vision, largest_block (the largest FSDP unit),
    largest_weight, root (what no block holds: embeddings, LM head), text, vision_config, deepstack)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = lambda module: sum(p.numel() for p in module.parameters())
    blocks = [count(m) for m in model.modules() if type(m).__name__ in model._no_split_modules]
    vision = config.vision_config
    return dict(config=config, params=count(model), vision=count(model.model.visual), largest_block=max(blocks),
                largest_weight=max(p.numel() for p in model.parameters()),
                root=count(model) - sum(blocks), text=config.get_text_config(), vision_config=vision,
                deepstack=len(getattr(vision, "deepstack_visual_indexes", []) or []))


def prompt_size(args, candidates=3):
    """The training prompt with the most tokens, encoded as training encodes it -> (tokens L, video patches, values per
    patch, video tokens). Each distinct video's header (video_pixels: nothing decoded) ranks them; the `candidates`
    largest are decoded and encoded, and the longest prompt counts (the processor's own resizing and caps decide)."""
    from transformers import AutoProcessor
    samples = data.load_samples(args.data, args.video_root, args.skip_bad)
    first = list({s.video: s for s in reversed(samples)}.values())  # one sample per video
    ranked = sorted(first, key=lambda s: video_pixels(s.video, args.fps, args.max_frames), reverse=True)
    processor = AutoProcessor.from_pretrained(args.student)
    prompts = []
    for sample in ranked[:candidates]:
        videos, _ = data.load_videos([sample], fps=args.fps, max_frames=args.max_frames)
        prompts.append(data.encode(processor, [sample], videos))
    prompt = max(prompts, key=lambda p: p["input_ids"].shape[1])
    patches = prompt["pixel_values_videos"].shape
    merge = getattr(processor.video_processor, "merge_size", 2)
    return prompt["input_ids"].shape[1], patches[0], patches[1], patches[0] // merge ** 2


def video_pixels(path, fps, max_frames):
    """Frames data.load_video would sample x pixels per frame, from the file's header alone (PyAV)."""
    import av
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 1)
            frames = stream.frames or int(float(container.duration or 0) / av.time_base * rate)
            width, height = stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, IndexError):  # unreadable: ranked last; training refuses or skips it (--skip-bad)
        return 0
    n = max(2, min(int(frames / rate * fps), max_frames))
    return (n - n % 2) * width * height


def layer_activations(tokens, hidden, intermediate, q, kv, bf16):
    """Bytes one decoder layer keeps for backward over `tokens` tokens (ACTIVATION)."""
    ci, cq, ckv, ch = ACTIVATION[bf16]
    return tokens * (ci * intermediate + cq * q + ckv * kv + ch * hidden)


def inference_layer(tokens, hidden, intermediate, nbytes):
    """The largest transient of one layer without gradients: its MLP's gate, up and their product, the residual."""
    return tokens * (3 * intermediate + 4 * hidden) * nbytes


def widths(text):
    """(hidden, intermediate, query width, key/value width, layers) of a text config."""
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return (text.hidden_size, text.intermediate_size, text.num_attention_heads * head,
            text.num_key_value_heads * head, text.num_hidden_layers)


def adapters(size, rank):
    """Parameters of rank-`rank` adapters on every linear layer of the language model's blocks (lib/lora.py):
    rank x (inputs + outputs) of q, k, v, o, gate, up and down."""
    H, I, q, kv, layers = widths(size["text"])
    return rank * layers * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))


def vision_pass(size, patches, nbytes):
    """One frozen vision tower's forward on `patches`: its largest layer transient."""
    v = size["vision_config"]
    return inference_layer(patches, v.hidden_size, v.intermediate_size, nbytes)


def estimate(args, frozen=(), group=1, world=1, cuda=None, first_step=False):
    """-> {part: bytes on each device}, "peak" the largest total. frozen: the inference-only models, each a path
    or (path, bytes per weight) (default: bf16 with a GPU, fp32 without, as rollout.load_model loads them);
    group: rollouts per prompt; world: processes (FSDP holds 1/world of every weight and state on each);
    first_step: AdamW's moments appear at the first optimizer step, after the activations are freed (a 1-step
    run's peak, as tests/bench_real_dims.py measures)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    student = model_size(args.student)
    frozen = [(f, None) if isinstance(f, str) else f for f in frozen]
    teachers = [(model_size(path), nbytes or (2 if cuda else 4)) for path, nbytes in frozen]
    L, patches, patch_values, video_tokens = prompt_size(args)
    act = 2 if args.bf16 else 4  # bytes of an activation: autocast computes in bf16
    trainable = student["params"] - (student["vision"] if args.freeze_vision else 0)
    lora = getattr(args, "lora_rank", 0)
    if lora:  # the adapters train; the rest stays in the dtype the run computes in (lib/lora.py)
        trainable = adapters(student, lora)
    prompts = max(1, args.prompts_per_step // world)  # this rank's prompts of a step
    micro = min(args.micro_batch, prompts)
    shape = dict(L=L, T=args.max_new_tokens, micro=micro, group=group, patches=patches, act=act,
                 packed=args.share_prompt and group > 1, share=args.share_prompt, world=world)
    # the step's rollouts, kept until the update: the student's video features (shared, frozen tower), else the video
    # patches (bf16 under --bf16, else fp32; once per prompt when shared); the teacher's logits (--loss fullkl)
    if args.share_prompt and args.freeze_vision:  # the features stand in for the patches (share.lean)
        stored = video_tokens * student["text"].hidden_size * (1 + student["deepstack"]) * act
    else:
        stored = patches * patch_values * act * (1 if args.share_prompt else group)
    if getattr(args, "loss", None) == "fullkl":
        stored += group * args.max_new_tokens * student["text"].vocab_size * 4  # fp32 (rollout.completion_logits)
    weight_bytes = act if lora else 4  # fp32 master weights (opd.load_student), or frozen under adapters
    parts = {"student weights": (weight_bytes * student["params"] + 4 * (trainable if lora else 0)) / world,
             "AdamW moments": 8 * trainable / world,
             "frozen models": sum(nbytes * size["params"] for size, nbytes in teachers) / world,
             "step's rollouts": prompts * stored}
    phases = {"student fwd+bwd": training(args, student, trainable, shape),
              "generate": generation(student, shape, weight_bytes),
              "teacher fwd": max([scoring(size, nbytes, shape) for size, nbytes in teachers], default=0)}
    # the gradients, and AdamW's temporaries: on a GPU its foreach step makes one of every weight's size at once
    # (the sqrt of the second moments), on CPU its loop makes two of one weight's size at a time
    temporary = trainable / world if cuda else 2 * student["largest_weight"]
    phases["optimizer step"] = 4 * trainable / world + 4 * temporary
    if first_step:
        phases["optimizer step"] += parts.pop("AdamW moments")  # made at the step, after the activations are freed
    static = sum(parts.values())
    parts.update(phases)
    parts["peak"] = static + max(phases.values())
    return parts


def training(args, size, trainable, s):
    """The student's forward + backward of one micro-batch: gradients, activations, bf16 weight copies."""
    H, I, q, kv, layers = widths(size["text"])
    seqs = s["micro"] * s["group"]
    tokens = s["micro"] * (s["L"] + s["group"] * s["T"]) if s["packed"] else seqs * (s["L"] + s["T"])
    layer = layer_activations(tokens, H, I, q, kv, args.bf16)
    if args.gradient_checkpointing:  # each layer keeps its input (the fp32 residual stream), one is recomputed
        total = layers * tokens * H * 4 + layer
    else:
        total = layers * layer
    total += 4 * seqs * s["T"] * size["text"].vocab_size * 4  # the logits, / T, masked, their log-softmax
    if s["packed"]:  # grouped_logits' [B, N, N] bool mask, and the additive copy sdpa makes (and keeps) per layer
        total += tokens ** 2 // s["micro"] * (1 + s["act"] * (1 if args.gradient_checkpointing else layers))
    if not args.freeze_vision:  # a trainable tower on each rollout's copy of the patches (rollout.forward_inputs)
        v = size["vision_config"]
        patches = s["micro"] * s["group"] * s["patches"]
        total += v.depth * layer_activations(patches, v.hidden_size, v.intermediate_size, v.hidden_size,
                                             v.hidden_size, args.bf16)
    total += 4 * trainable / s["world"]  # the gradients
    tied = getattr(size["config"], "tie_word_embeddings", False) and not getattr(args, "lora_rank", 0)
    if tied:  # the LM head's gradient and the embedding's, summed
        total += size["text"].vocab_size * H * 4 / s["world"]
    if args.bf16 and s["world"] == 1:  # autocast keeps a bf16 copy of each trainable weight for the backward
        total += 2 * trainable
    if s["world"] > 1:  # FSDP gathers a block (and the next, prefetched) and the root's embeddings, LM head, in bf16
        total += (2 * size["largest_block"] + size["root"]) * (2 if args.bf16 else 4)  # under --bf16 (fsdp.shard)
    return total


def generation(size, s, weight_bytes=4):
    """generate on one micro-batch: the KV cache of every rollout, one prefill layer, the vision tower.
    weight_bytes: of the student's weights (2: bf16 frozen weights under adapters with --bf16)."""
    H, I, q, kv, layers = widths(size["text"])
    seqs = s["micro"] * s["group"]
    keys = 4 if s["world"] == 1 and weight_bytes == 4 else s["act"]  # fp32 under autocast over fp32 weights
    cache = kv_cache(size, seqs, s["L"] + s["T"], keys, s["act"])  # rollout.prefilled repeats it per rollout
    prefill = inference_layer(s["micro"] * s["L"] if s["packed"] else seqs * s["L"], H, I, s["act"])
    copies = 1 if s["share"] else s["group"]
    vision = vision_pass(size, s["micro"] * s["patches"] * copies, s["act"])
    gathered = (2 * size["largest_block"] + size["root"]) * s["act"] if s["world"] > 1 else 0  # bf16 under --bf16
    return cache + max(prefill, vision) + gathered


def kv_cache(size, rows, tokens, key_bytes, value_bytes):
    """Bytes of the KV cache of `rows` sequences of `tokens`, keys and values of the sizes given. bf16 autocast over
    fp32 weights (the student in one process) keeps fp32 keys, Qwen3's fp32 k_norm weight and the rope promote them,
    beside bf16 values; bf16 weights (a loaded teacher, FSDP's mixed precision) keep both in bf16
    (tests/test_memory.py checks both against a real cache)."""
    H, I, q, kv, layers = widths(size["text"])
    return layers * kv * tokens * rows * (key_bytes + value_bytes)


def scoring(size, nbytes, s):
    """A frozen model's forward over one micro-batch's rollouts (no gradients): a layer, the vision tower, logits."""
    H, I, q, kv, layers = widths(size["text"])
    seqs = s["micro"] * s["group"]
    tokens = s["micro"] * (s["L"] + s["group"] * s["T"]) if s["packed"] else seqs * (s["L"] + s["T"])
    copies = 1 if s["share"] else s["group"]
    layer = max(inference_layer(tokens, H, I, nbytes), vision_pass(size, s["micro"] * s["patches"] * copies, nbytes))
    logits = 3 * seqs * s["T"] * size["text"].vocab_size * 4
    gathered = (2 * size["largest_block"] + size["root"]) * nbytes if s["world"] > 1 else 0
    return layer + logits + gathered


def line(parts):
    """One line: the peak and what it is made of, in GiB."""
    phases = ("student fwd+bwd", "generate", "teacher fwd", "optimizer step")
    gib = lambda n: f"{n / GB:.1f}" if n >= GB else f"{n / GB:.3f}"  # the miniature's models are a few MB
    static = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if k not in phases + ("peak",) and v)
    largest = max((k for k in phases if k in parts), key=parts.get)
    return f"estimated peak {gib(parts['peak'])} GiB per device: {static}, + {largest} {gib(parts[largest])}"


# What the count leaves out, allowed for when a GPU's free memory is checked: the CUDA context with its cuBLAS and
# cuDNN workspaces, NCCL's buffers under torchrun, and the caching allocator's fragmentation (memory reserved but not
# allocated), as a share of the peak. Stated, not measured: no GPU was lent to the task that wrote this.
CONTEXT, NCCL, FRAGMENTATION = 1 * GB, 1 * GB, 0.10


def allowance(parts, world=1):
    """Bytes to keep free beside the counted peak (CONTEXT, NCCL, FRAGMENTATION)."""
    return CONTEXT + (NCCL if world > 1 else 0) + FRAGMENTATION * parts["peak"]


def check(args, frozen=(), group=1):
    """Before the models load: print the estimate; with a CUDA device whose free memory is smaller than the peak and
    the allowance, refuse in one line (--force starts anyway)."""
    parts = estimate(args, frozen, group, world=fsdp.world())
    if fsdp.rank() == 0:
        print("memory: " + line(parts))
    if torch.cuda.is_available() and not args.force:
        free, extra = torch.cuda.mem_get_info()[0], allowance(parts, fsdp.world())
        if parts["peak"] + extra > free:
            raise data.DataError(f"the run needs about {(parts['peak'] + extra) / GB:.1f} GiB per GPU (counted "
                                 f"{parts['peak'] / GB:.1f}, + {extra / GB:.1f} for the CUDA context, NCCL and "
                                 f"fragmentation), this GPU has {free / GB:.1f} GiB free: lower --micro-batch or "
                                 "--max-frames, add --gradient-checkpointing / --bf16, use more GPUs (torchrun), or "
                                 "--force")
    return parts
