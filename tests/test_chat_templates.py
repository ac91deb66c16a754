"""The official Qwen3-VL-Instruct and Qwen2.5-VL-Instruct chat templates (tests/data/chat_templates, SOURCES.md there)
through data.encode: the text layout each model was trained on, and the miniature's own template against Qwen3-VL's.

The expected strings are written out in full: they are the documentation of what the models see.
"""
import hashlib
import re

import pytest
import torch

import data
from lib import miniature
from conftest import TESTS_DATA

TEMPLATES = TESTS_DATA / "chat_templates"
QWEN3_VL = (TEMPLATES / "qwen3_vl_instruct.jinja").read_text()
# the official Qwen3-VL video layout for tiny.mp4, written out from the model's own processor (SOURCES.md)
QWEN3_VL_TINY_VIDEO = (TEMPLATES / "qwen3_vl_tiny_video_prompt.txt").read_text()
QWEN25_VL = (TEMPLATES / "qwen2_5_vl_instruct.jinja").read_text()

QUERY = "the red circle"
INSTRUCTION = ("Please find the visual event described by the sentence 'the red circle', determining its starting and "
               "ending times. The format should be: 'The event happens in <start time> - <end time> seconds'.")
ANSWER = "The event happens in 1.0 - 2.0 seconds"


# ----------------------------------------------------------------------------- processors
@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """The miniature's processor as miniature.build saves it (its tokenizer, real Qwen3VLProcessor,
    miniature.CHAT_TEMPLATE)."""
    out = tmp_path_factory.mktemp("toy_processor")
    miniature.make_processor(str(out), miniature.ToyConfig.reduced())
    return out


def _load(path, chat_template):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(path)
    processor.chat_template = chat_template
    return processor


@pytest.fixture(scope="module")
def toy_processor(toy_dir):
    return _load(toy_dir, miniature.CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def qwen3(toy_dir):
    """The same Qwen3VLProcessor with the official Qwen3-VL-Instruct template in place of the miniature's."""
    return _load(toy_dir, QWEN3_VL)


@pytest.fixture(scope="module")
def qwen25(toy_dir):
    """A Qwen2_5_VLProcessor (patch 14, as in tests/test_qwen25.py) on the miniature's tokenizer, official template."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    n_pix = 28 * 28
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": n_pix, "longest_edge": n_pix * 4}),
        video_processor=Qwen2VLVideoProcessor(size={"shortest_edge": n_pix, "longest_edge": n_pix * 1024},
                                              do_sample_frames=False, cap_pixels_per_frame=False),
        tokenizer=_load(toy_dir, None).tokenizer, chat_template=QWEN25_VL)


@pytest.fixture(scope="module")
def tiny_video():
    """tests/data/tiny.mp4 at 2 fps: 4 frames of 32x32 (indices 0, 2, 5, 8 of a 5 fps file), always present."""
    return data.load_video(str(TESTS_DATA / "tiny.mp4"))


def render(processor, messages, generation_prompt):
    return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def decoded(processor, batch, row=0):
    return processor.tokenizer.decode(batch["input_ids"][row])


def pads(processor, batch, row=0):
    return (batch["input_ids"][row] == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum().item()


# ----------------------------------------------------------------------------- the files themselves
@pytest.mark.parametrize("name, size, sha256", [
    ("qwen3_vl_instruct.jinja", 5292, "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"),
    ("qwen2_5_vl_instruct.jinja", 1017, "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb"),
])
def test_template_files_are_the_official_bytes(name, size, sha256):
    """Byte for byte what SOURCES.md records (an editor's trailing newline or reformat would fail here)."""
    raw = (TEMPLATES / name).read_bytes()
    assert (len(raw), hashlib.sha256(raw).hexdigest()) == (size, sha256)


# ----------------------------------------------------------------------------- prompt text
def test_qwen3_vl_prompt_layout(qwen3):
    """No system prompt unless the messages have one; the video, then the TimeLens instruction; the generation prompt."""
    messages = data.prompt_messages(QUERY)
    assert render(qwen3, messages, True) == (
        "<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>" + INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render(qwen3, messages, False) == (
        "<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>" + INSTRUCTION + "<|im_end|>\n")


def test_qwen25_vl_prompt_layout(qwen25):
    """Qwen2.5-VL puts its default system prompt first when the messages have none."""
    messages = data.prompt_messages(QUERY)
    assert render(qwen25, messages, True) == (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>" + INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_the_instruction_is_timelens(qwen3):
    assert data.PROMPT.format(query=QUERY) == INSTRUCTION
    assert INSTRUCTION in render(qwen3, data.prompt_messages(QUERY), True)


def conversations():
    """What this project renders: the prompt, and SFT-style conversations with the answer (as text and as parts)."""
    prompt = data.prompt_messages(QUERY)
    return {
        "prompt": prompt,
        "answer as string": prompt + [{"role": "assistant", "content": ANSWER}],
        "answer as parts": prompt + [{"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}],
        "string user turn": [{"role": "user", "content": INSTRUCTION}],
    }


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(conversations()))
def test_miniature_template_renders_like_official_qwen3_vl(toy_processor, qwen3, name, generation_prompt):
    messages = conversations()[name]
    assert render(toy_processor, messages, generation_prompt) == render(qwen3, messages, generation_prompt)


def test_sft_text_is_the_official_answer_turn(qwen3, tiny_video):
    """data.encode(answers=...) = generation prompt + answer + <|im_end|>: the official answer turn but its last '\\n'."""
    sample = data.Sample("tiny.mp4", QUERY, (1.0, 2.0), None, "tiny#0")
    batch = data.encode(qwen3, [sample], [tiny_video], answers=[ANSWER])
    official = render(qwen3, conversations()["answer as string"], False)
    assert official.endswith("<|im_start|>assistant\n" + ANSWER + "<|im_end|>\n")
    text = decoded(qwen3, batch)
    assert text.endswith("<|im_start|>assistant\n" + ANSWER + "<|im_end|>")
    # the same up to the video, which the processor expanded in one (from its first stamp) and not the other
    assert text.split("<0.2 seconds>")[0] == official.split("<|vision_start|>")[0]
    assert text.split("<|vision_end|>")[-1] + "\n" == official.split("<|vision_end|>")[-1]
    assert text.startswith(QWEN3_VL_TINY_VIDEO)


# ----------------------------------------------------------------------------- data.encode: video tokens
def test_encode_qwen3_vl_on_tiny_video(qwen3, toy_processor, tiny_video):
    """Each pair of frames becomes `<t seconds><|vision_start|>pads<|vision_end|>`, in place of the template's whole
    <|vision_start|><|video_pad|><|vision_end|>: the layout of the model's own processor, written out in test data
    (SOURCES.md). 32x32 frames: 2x2 patches -> 1 pad each."""
    sample = data.Sample("tiny.mp4", QUERY, (1.0, 2.0), None, "tiny#0")
    batch = data.encode(qwen3, [sample], [tiny_video])
    assert batch["video_grid_thw"].tolist() == [[2, 2, 2]]
    assert decoded(qwen3, batch) == QWEN3_VL_TINY_VIDEO
    assert QWEN3_VL_TINY_VIDEO == (
        "<|im_start|>user\n"
        "<0.2 seconds><|vision_start|><|video_pad|><|vision_end|>"   # frames 0, 2 of 5 fps: mean 0.2 s
        "<1.3 seconds><|vision_start|><|video_pad|><|vision_end|>"   # frames 5, 8: mean 1.3 s
        + INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert pads(qwen3, batch) == batch["video_grid_thw"][0].prod().item() // qwen3.video_processor.merge_size ** 2
    # the miniature's template gives the very same tokens
    assert torch.equal(data.encode(toy_processor, [sample], [tiny_video])["input_ids"], batch["input_ids"])


def test_encode_qwen25_vl_on_tiny_video(qwen25, tiny_video):
    """Qwen2.5-VL: no text stamps, time comes from second_per_grid_ts; the pads sit in the template's own wrapper."""
    sample = data.Sample("tiny.mp4", QUERY, (1.0, 2.0), None, "tiny#0")
    batch = data.encode(qwen25, [sample], [tiny_video])
    assert batch["video_grid_thw"].tolist() == [[2, 2, 2]]
    assert decoded(qwen25, batch) == (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|video_pad|><|vision_end|>" + INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert pads(qwen25, batch) == batch["video_grid_thw"][0].prod().item() // qwen25.video_processor.merge_size ** 2
    assert torch.as_tensor(batch["second_per_grid_ts"]).tolist() == [1.0]


def test_encode_qwen3_vl_on_ohofg(shared, ohofg, qwen3, toy_processor):  # shared first: skip early
    frames, meta = ohofg
    query = "person sitting down in a chair."
    sample = data.Sample(str(shared / "data" / "OHOFG.mp4"), query, (1.0, 7.5), 35.1, "OHOFG#1")
    batch = data.encode(qwen3, [sample], [(frames, meta)])
    text = decoded(qwen3, batch)
    t, h, w = batch["video_grid_thw"][0].tolist()
    per_group = h * w // qwen3.video_processor.merge_size ** 2
    assert t == len(frames) // 2 == 35
    assert pads(qwen3, batch) == t * per_group
    group = r"<(\d+\.\d) seconds><\|vision_start\|>((?:<\|video_pad\|>)+)<\|vision_end\|>"
    m = re.fullmatch(r"<\|im_start\|>user\n((?:" + group + r")+)(.*)<\|im_end\|>\n<\|im_start\|>assistant\n",
                     text, re.S)
    assert m, text[:300]
    groups = re.findall(group, m.group(1))
    assert [s for s, _ in groups][:3] == ["0.3", "1.3", "2.3"] and len(groups) == t
    assert all(len(p) == per_group * len("<|video_pad|>") for _, p in groups)
    assert m.group(4) == data.PROMPT.format(query=query)
    assert torch.equal(data.encode(toy_processor, [sample], [(frames, meta)])["input_ids"], batch["input_ids"])


def test_encode_qwen25_vl_on_ohofg(shared, ohofg, qwen25):
    frames, meta = ohofg
    query = "person sitting down in a chair."
    sample = data.Sample(str(shared / "data" / "OHOFG.mp4"), query, (1.0, 7.5), 35.1, "OHOFG#1")
    batch = data.encode(qwen25, [sample], [(frames, meta)])
    text = decoded(qwen25, batch)
    n = pads(qwen25, batch)
    assert n == batch["video_grid_thw"][0].prod().item() // qwen25.video_processor.merge_size ** 2
    assert batch["video_grid_thw"][0, 0].item() == 35
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>" + data.PROMPT.format(query=query)
                    + "<|im_end|>\n<|im_start|>assistant\n")
    assert "seconds>" not in text


# ----------------------------------------------------------------------------- a processor with another layout
NESTING = QWEN3_VL.replace("<|vision_start|><|video_pad|><|vision_end|>",
                           "<|vision_start|><|vision_start|><|video_pad|><|vision_end|><|vision_end|>")


@pytest.mark.parametrize("answers", [None, [ANSWER]])
def test_a_processor_that_nests_the_video_wrapper_is_refused(toy_dir, tiny_video, answers):
    """transformers 5.24.0's layout (the template's pair kept around all frame groups), made here by a template that
    wraps the video twice: data.encode refuses it in one line naming the version, for prompts and for SFT texts."""
    import transformers
    nesting = _load(toy_dir, NESTING)
    sample = data.Sample("tiny.mp4", QUERY, (1.0, 2.0), None, "tiny#0")
    text = render(nesting, data.prompt_messages(QUERY), True)
    assert "<|vision_start|><|vision_start|><|video_pad|>" in text  # the template does nest
    with pytest.raises(data.DataError, match=f"transformers {re.escape(transformers.__version__)} lays out") as err:
        data.encode(nesting, [sample], [tiny_video], answers=answers)
    assert "\n" not in str(err.value).split("...")[-1] and "requirements.txt" in str(err.value)


def test_a_prompt_whose_frame_group_lost_its_start_is_refused(qwen3, tiny_video):
    """The other way a layout can differ: fewer <|vision_start|> than frame groups (here the first one removed)."""
    sample = data.Sample("tiny.mp4", QUERY, (1.0, 2.0), None, "tiny#0")
    batch = data.encode(qwen3, [sample], [tiny_video])
    start = qwen3.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    first = (batch["input_ids"][0] == start).nonzero()[0].item()
    broken = {**batch, "input_ids": torch.cat([batch["input_ids"][:, :first], batch["input_ids"][:, first + 1:]], 1)}
    with pytest.raises(data.DataError, match="one <\\|vision_start\\|> per frame group"):
        data.check_video_layout(qwen3, broken)
    data.check_video_layout(qwen3, batch)  # the official one passes
