"""Qwen2.5-VL through the same data.py / opd.py path: time comes from fps (second_per_grid_ts), not text stamps."""
import json

import pytest
import torch

import data
import rollout
from lib import miniature, share
from test_opd import _run


def make_qwen25(out, processor_src, hidden, seed):
    """A tiny random-init Qwen2.5-VL sharing the miniature's tokenizer, saved with its own Qwen2.5-VL processor."""
    from transformers import (AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    tok = AutoProcessor.from_pretrained(processor_src).tokenizer
    n_pix = 28 * 28
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": n_pix, "longest_edge": n_pix * 4}),
        video_processor=Qwen2VLVideoProcessor(size={"shortest_edge": n_pix, "longest_edge": n_pix * 1024},
                                              do_sample_frames=False, cap_pixels_per_frame=False),
        tokenizer=tok, chat_template=miniature.CHAT_TEMPLATE)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                         num_attention_heads=hidden // 16, num_key_value_heads=hidden // 16, bos_token_id=None,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}),
        # patch_size must be the processor's (14); window_size the default 112, or window attention indexes break
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=hidden,
                           patch_size=14, window_size=112, fullatt_block_indexes=[0]),
        tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen25(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen25")
    return {"student": make_qwen25(str(root / "student"), tiny["student"], 64, 0),
            "teacher": make_qwen25(str(root / "teacher"), tiny["student"], 96, 1),
            "train": tiny["train"], "test": tiny["test"]}


def test_time_comes_from_the_sampled_fps(qwen25):
    model, processor = rollout.load_model(qwen25["student"])
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    samples = data.load_annotations(qwen25["test"])[:2]
    videos, _ = data.load_videos(samples)
    batch = data.encode(processor, samples, videos)
    # 2 fps sampled, frames merged in pairs: each temporal patch spans 1 second
    assert torch.allclose(torch.as_tensor(batch["second_per_grid_ts"]).float(), torch.ones(2))
    assert "seconds>" not in processor.tokenizer.decode(batch["input_ids"][0])  # no text stamps in Qwen2.5-VL
    # expanded rollouts keep each prompt's video and its time scale
    with torch.no_grad():
        base = model(**batch).logits
        big = model(**share.expand(batch, 2)).logits
    assert torch.allclose(big[0], base[0], atol=1e-5) and torch.allclose(big[3], base[1], atol=1e-5)


def test_opd_two_steps_on_a_qwen25_pair(qwen25, tmp_path):
    out = _run("opd.py", qwen25, tmp_path, "--steps", "2", "--loss", "fullkl")
    assert "student after" in out
    steps = [json.loads(x) for x in open(tmp_path / "log.jsonl") if '"loss"' in x]
    assert [r["step"] for r in steps] == [1, 2] and steps[0]["grad_norm"] > 0
