"""lib/memory.py's estimate for the README's real-model commands, from the real configs (no weights are read).

    python tests/bench_estimates.py          # one line per command: GiB per GPU and what it is made of (and eval.py)

The configs are Qwen3-VL-2B / 8B-Instruct's (tests/bench_real_dims.py); the 32B teacher (the official Video-OPD
teacher, williamljz/Video-opd-teacher-Qwen3-VL-32B-GRPO, is a post-trained Qwen3-VL-32B) takes Qwen3-32B's text widths
with the 8B vision tower. The prompt is the real Charades clip in ../shared at 2 fps (its processor: the real one's
video settings), or a synthetic 35 s 640x360 clip without it.
"""
import os
import sys
import tempfile
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_real_dims as bench  # noqa: E402

REAL_32B = dict(text=bench.REAL_8B["text"] | dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                                                  num_attention_heads=64),
                vision=bench.REAL_8B["vision"] | dict(out_hidden_size=5120), tie_word_embeddings=False)
# (student, teacher or None, GPUs, rollouts per prompt, prompts per step, micro-batch, --loss, --lora-rank): the
# README's commands
COMMANDS = {
    "OPD 2B + 8B teacher, one GPU, --micro-batch 1": ("2B", "8B", 1, 1, 32, 1, "sampled", 0),
    "GRPO 2B, one GPU, 8 rollouts, --micro-batch 2": ("2B", None, 1, 8, 4, 2, None, 0),
    "OPD 8B + 32B teacher, 8 GPUs, --micro-batch 4": ("8B", "32B", 8, 1, 32, 4, "sampled", 0),
    "OPD 8B + 32B teacher, 8 GPUs, --micro-batch 1 (the official recipe)": ("8B", "32B", 8, 1, 32, 1, "sampled", 0),
    "GRPO 8B, 8 GPUs, --micro-batch 1": ("8B", None, 8, 8, 8, 1, None, 0),
    "OPD 8B + 32B teacher, one GPU, --micro-batch 1, every weight": ("8B", "32B", 1, 1, 32, 1, "sampled", 0),
    "OPD 8B + 8B teacher, one GPU, --micro-batch 1, --lora-rank 8": ("8B", "8B", 1, 1, 32, 1, "sampled", 8),
    "OPD 8B + 32B teacher, one GPU, --micro-batch 1, --lora-rank 8": ("8B", "32B", 1, 1, 32, 1, "sampled", 8),
}


def config_folder(root, name, real, processor):
    """A folder holding only the config (and the processor) of a full-depth model of `real`'s widths."""
    from transformers import Qwen3VLConfig
    from lib import miniature
    folder = os.path.join(root, name)
    tok = processor.tokenizer
    Qwen3VLConfig(text_config=real["text"] | dict(pad_token_id=tok.pad_token_id), vision_config=real["vision"],
                  tie_word_embeddings=real["tie_word_embeddings"], **miniature.vision_token_ids(tok)
                  ).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main():
    from lib import memory
    root = tempfile.mkdtemp()
    processor = bench.make_processor(os.path.join(root, "processor"))
    folders = {name: config_folder(root, name, real, processor)
               for name, real in (("2B", bench.REAL_2B), ("8B", bench.REAL_8B), ("32B", REAL_32B))}
    train = bench.make_data(root)
    for label, (student, teacher, gpus, group, prompts, micro, loss, rank) in COMMANDS.items():
        args = SimpleNamespace(student=folders[student], data=train, video_root=None, skip_bad=False, fps=2.0,
                               max_frames=768, bf16=True, freeze_vision=True, prompts_per_step=prompts,
                               micro_batch=micro, share_prompt=True, max_new_tokens=64, loss=loss,
                               gradient_checkpointing=True, lora_rank=rank)
        parts = memory.estimate(args, [folders[teacher]] if teacher else [], group, world=gpus, cuda=True)
        print(f"{label}: {memory.line(parts)}")
    for name, batch in (("8B", 8), ("8B", 1)):  # eval.py: the bf16 model and one generate call of --batch-size
        args.student = folders[name]
        L, patches, _, _ = memory.prompt_size(args)
        size = memory.model_size(folders[name])
        weights = 2 * size["params"]  # loaded in bf16 (rollout.load_model): a bf16 cache, no autocast
        generate = memory.kv_cache(size, batch, L + 32, 2, 2) + max(
            memory.inference_layer(batch * L, *memory.widths(size["text"])[:2], 2),
            memory.vision_pass(size, batch * patches, 2))
        print(f"eval.py, {name}, --batch-size {batch}: {(weights + generate) / memory.GB:.1f} GiB: weights "
              f"{weights / memory.GB:.1f}, + generate {generate / memory.GB:.1f}")


if __name__ == "__main__":
    main()
