"""One OPD step and one GRPO step at the real Qwen3-VL-2B / 8B widths, through opd.py and grpo.py themselves.

    python tests/bench_real_dims.py [--text-layers 1 2] [--vision-layers 1] [--group-size 2] [--bf16]
    python tests/bench_real_dims.py --text-layers 1 --group-size 4 --sharing both   # shared prompt vs copies

Student and teacher are random-init Qwen3VLForConditionalGeneration models with every dimension of the real
checkpoints (REAL_2B, REAL_8B below: widths, heads, KV heads, head dim, vocabulary, mrope, patch / merge /
temporal patch, the video processor's size bounds) except the depths, which are reduced so that a step fits a
2-core CPU; the deepstack taps keep their relative place in the reduced vision tower. The prompt is a real-length
video at 2 fps: the Charades clip ../shared/data/OHOFG.mp4 (35 s, 640x360) when present, otherwise a synthetic
clip of the same length and size. Each configuration runs `opd.py` / `grpo.py` for one step in its own process
with the README's real-model flags (--gradient-checkpointing, --bf16 when asked) and reports, from the run's
log.jsonl and a 20 ms sampler of the process's resident memory: time per phase, peak memory per phase (and the
process's memory before any model loads, start_rss_mb), the run's own memory.estimate (estimate_mb), and the
work per phase: vision-tower patches and LLM tokens each model ran on. `--sharing both` runs each step twice, as
trained (lib/share.py: each video once, a group's prompt once) and with --no-share-prompt (a copy per rollout).
The difference between two text depths is one text layer's share; docs/results.md ("Memory per GPU") scales it
to full depth.
Prints one JSON line per configuration.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CLIP = os.path.join(os.path.dirname(ROOT), "shared", "data", "OHOFG.mp4")

# config.json of Qwen/Qwen3-VL-2B-Instruct and Qwen/Qwen3-VL-8B-Instruct, as copied in public test fixtures
# (Intel OpenVINO GenAI's Qwen3VLSpecTest, NVIDIA TensorRT-LLM tests/unittest/_torch/modeling/test_modeling_qwen3vl.py,
# pytorch/torchtitan torchtitan/experiments/qwen3_vl flavours "2B" / "8B"; each value found in two or more of them).
ROPE = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
REAL_2B = dict(
    text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
              num_key_value_heads=8, head_dim=128, vocab_size=151_936, rms_norm_eps=1e-6, hidden_act="silu",
              max_position_embeddings=262_144, rope_parameters=ROPE),
    vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh"),
    tie_word_embeddings=True)
REAL_8B = dict(
    text=REAL_2B["text"] | dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                num_attention_heads=32),
    vision=REAL_2B["vision"] | dict(depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
                                    deepstack_visual_indexes=[8, 16, 24]),
    tie_word_embeddings=False)
# glibc keeps freed blocks under its (adaptive) mmap threshold in the heap, so resident memory would also count what
# earlier phases freed; a fixed 64 KB threshold returns every larger block at once: resident memory = live tensors
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# video_preprocessor_config.json of the same checkpoints: the size bounds are over the whole clip (t * h * w)
REAL_VIDEO = dict(size={"longest_edge": 25_165_824, "shortest_edge": 4096}, patch_size=16, temporal_patch_size=2,
                  merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def build_model(folder, real, text_layers, vision_layers, processor):
    """save_pretrained a random-init model of `real`'s dimensions at the given depths, with `processor`."""
    import torch
    from lib import miniature
    from transformers import AutoModelForImageTextToText, Qwen3VLConfig
    tok = processor.tokenizer
    full, vision = real["vision"]["depth"], real["vision"]
    taps = sorted({min(vision_layers - 1, i * vision_layers // full) for i in vision["deepstack_visual_indexes"]})
    config = Qwen3VLConfig(text_config=real["text"] | dict(num_hidden_layers=text_layers,
                                                           pad_token_id=tok.pad_token_id),
                           vision_config=vision | dict(depth=vision_layers, deepstack_visual_indexes=taps),
                           tie_word_embeddings=real["tie_word_embeddings"], **miniature.vision_token_ids(tok))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def make_processor(folder):
    """The miniature's offline tokenizer and chat template with real Qwen3-VL's video processor settings."""
    from lib import miniature
    from transformers import Qwen3VLVideoProcessor
    processor = miniature.make_processor(folder, miniature.ToyConfig.reduced())
    processor.video_processor = Qwen3VLVideoProcessor(**REAL_VIDEO, cap_pixels_per_frame=True, do_sample_frames=False)
    return processor


def make_data(folder):
    """train.jsonl with one query on the real clip (or a synthetic 35 s 640x360 one)."""
    import numpy as np
    import data
    video = CLIP
    if not os.path.exists(video):
        import av
        video = os.path.join(folder, "synthetic.mp4")
        with av.open(video, "w") as out:
            stream = out.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
            rng = np.random.default_rng(0)
            for _ in range(350):
                frame = rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)
                for pkt in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(pkt)
            for pkt in stream.encode():
                out.mux(pkt)
    path = os.path.join(folder, "train.jsonl")
    data.write_jsonl([data.Sample(video, "a person sits on a chair by a table", (1.0, 7.5), 35.04, "OHOFG")], path)
    return path


def child(script, argv, out_json):
    """Run `script argv` in this process, sampling resident memory per phase (the phase = the last of opd's
    functions entered: generate, teacher scoring = rollout.completion_logits without grad, student = with grad +
    backward)."""
    import importlib
    import torch
    import rollout
    from lib import memory, run
    page = os.sysconf("SC_PAGE_SIZE")
    phase, peaks, patches, tokens, estimated = ["load"], {}, {}, {}, {}

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2 ** 20
    start = rss()  # the interpreter and the libraries, before any model: what memory.estimate does not count
    estimate = memory.estimate

    def first_step(args, *a, **kw):  # the run's own estimate, as a 1-step run peaks (AdamW made at its step)
        estimated.update({k: round(v / 2 ** 20) for k, v in estimate(args, *a, **kw, first_step=True).items()})
        return estimate(args, *a, **kw)
    memory.estimate = first_step

    def sample():
        while True:
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss())
            time.sleep(0.02)
    threading.Thread(target=sample, daemon=True).start()

    def labelled(fn, name):
        def wrapper(*a, **kw):
            phase[0] = name(*a) if callable(name) else name
            return fn(*a, **kw)
        return wrapper
    def counted(load):
        def wrapper(*a, **kw):
            model, processor = load(*a, **kw)
            add = lambda seen, n: seen.__setitem__(phase[0], seen.get(phase[0], 0) + n)
            model.model.visual.register_forward_pre_hook(lambda m, args: add(patches, args[0].shape[0]))
            model.model.language_model.register_forward_pre_hook(
                lambda m, args, kw: add(tokens, kw["inputs_embeds"].shape[:2].numel()), with_kwargs=True)
            return model, processor
        return wrapper
    rollout.load_model = counted(rollout.load_model)
    rollout.generate = labelled(rollout.generate, "generate")
    rollout.completion_logits = labelled(rollout.completion_logits,
                                         lambda *a: "student fwd+bwd" if torch.is_grad_enabled() else "teacher fwd")
    run.save = labelled(run.save, "save")
    sys.argv = [script, *argv]
    importlib.import_module(script[:-3]).main()  # the module, not a fresh __main__, so the wrappers above apply
    peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss())
    with open(out_json, "w") as f:
        json.dump({"peak_rss_mb": {k: round(v) for k, v in peaks.items()}, "start_rss_mb": round(start),
                   "estimate_mb": estimated, "vision_patches": patches, "llm_tokens": tokens}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-layers", type=int, nargs="+", default=[1, 2], help="text depths to run (student = teacher)")
    p.add_argument("--vision-layers", type=int, default=1, help="vision depth of both models")
    p.add_argument("--group-size", type=int, default=2, help="GRPO rollouts per prompt (paper: 8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="completion length (random weights never stop)")
    p.add_argument("--scripts", nargs="+", default=["opd.py", "grpo.py"], help="which steps to run")
    p.add_argument("--bf16", action="store_true", help="add --bf16 (slow on CPUs without bf16 units)")
    p.add_argument("--sharing", choices=["on", "off", "both"], default="on",
                   help="on: as trained; off: --no-share-prompt (a copy of the prompt per rollout); both: each")
    p.add_argument("--workdir", default="/tmp/bench_real_dims", help="scratch folder (models are ~2-7 GB each)")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[2:], a.child[1])
    os.makedirs(a.workdir, exist_ok=True)
    processor = make_processor(os.path.join(a.workdir, "processor"))
    train = make_data(a.workdir)
    import data
    (sample,) = data.load_annotations(train)
    prompt = data.encode(processor, [sample], [data.load_video(sample.video)])
    prompt_tokens, video_tokens = prompt["input_ids"].shape[1], int(prompt["video_grid_thw"].prod()) // 4
    for layers in a.text_layers:
        models = {}
        for name, real in (("student", REAL_2B), ("teacher", REAL_8B)):
            models[name] = os.path.join(a.workdir, f"{name}-{layers}x{a.vision_layers}")
            params = build_model(models[name], real, layers, a.vision_layers, processor)
            models[f"{name}_params"] = params
        for script in a.scripts:
            for sharing in ["on", "off"] if a.sharing == "both" else [a.sharing]:
                run_step(a, script, sharing, models, train, layers, prompt_tokens, video_tokens)


def run_step(a, script, sharing, models, train, layers, prompt_tokens, video_tokens):
    """One step of `script` in a child process -> prints its JSON line."""
    out = os.path.join(a.workdir, f"run-{script[:-3]}-{layers}-{sharing}")
    flags = ["--student", models["student"], "--data", train, "--out", out, "--steps", "1",
             "--prompts-per-step", "1", "--micro-batch", "1", "--num-workers", "0", "--max-new-tokens",
             str(a.max_new_tokens), "--gradient-checkpointing", *(["--bf16"] if a.bf16 else []),
             *(["--no-share-prompt"] if sharing == "off" else [])]
    flags += ["--teacher", models["teacher"], "--loss", "sampled"] if script == "opd.py" else [
        "--group-size", str(a.group_size)]
    shutil.rmtree(out, ignore_errors=True)  # this benchmark's own scratch run
    measured = out + ".measured.json"
    t0 = time.time()
    subprocess.run([sys.executable, __file__, "--child", script, measured, *flags], check=True,
                   stdout=subprocess.DEVNULL, env=os.environ | LIVE_MEMORY)
    (step,) = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r]
    print(json.dumps({"script": script, "sharing": sharing, "text_layers": layers,
                      "vision_layers": a.vision_layers, "bf16": a.bf16, "prompt_tokens": prompt_tokens,
                      "video_tokens": video_tokens, "group_size": a.group_size if script == "grpo.py" else 1,
                      "student_params": models["student_params"], "teacher_params": models["teacher_params"],
                      "step_s": round(sum(step["time"].values()), 1), "time_s": step["time"],
                      **json.load(open(measured)), "process_s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
