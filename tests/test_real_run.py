"""The path a GPU user runs: every flag of the README's real-model commands (--gradient-checkpointing, --bf16,
--micro-batch, a checkpoint's own generation_config.json) must train exactly as the plain miniature run does."""
import dataclasses
import json
import shutil

import pytest
import torch

import data
import grpo
import opd
import rollout
from test_opd import _run, _weights

JUNK = {"do_sample": True, "repetition_penalty": 1.8, "no_repeat_ngram_size": 2, "top_k": 3, "top_p": 0.5,
        "temperature": 0.3, "min_p": 0.2}  # what a real checkpoint may ship, exaggerated


# whole answers (14 tokens) near greedy, so that some rollouts earn a reward on the reduced miniature; the
# default 8 tokens of test_opd._run cut every answer before its end (rollout IoU 0 with or without a bug)
GROUNDING = ("--max-new-tokens", "16", "--temperature", "0.5")


def _steps(folder):
    return [r for r in map(json.loads, open(folder / "log.jsonl")) if "loss" in r]


@pytest.mark.parametrize("script", ["opd.py", "grpo.py"])
def test_gradient_checkpointing_trains_like_the_plain_run(tiny, tmp_path, script):
    """Before the fix: with the flag every rollout was 'The event event event ...' (rollout IoU 0, loss x5)."""
    plain = _run(script, tiny, tmp_path / "plain", "--steps", "2", *GROUNDING)
    ckpt = _run(script, tiny, tmp_path / "ckpt", "--steps", "2", "--gradient-checkpointing", *GROUNDING)
    a, b = _steps(tmp_path / "plain"), _steps(tmp_path / "ckpt")
    assert [r["rollout_iou"] for r in a] == [r["rollout_iou"] for r in b]  # the same rollouts
    assert any(r["rollout_iou"] > 0 for r in a)  # ... and rollouts that ground at all
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    wa, wb = _weights(tmp_path / "plain" / "final"), _weights(tmp_path / "ckpt" / "final")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert plain.split("student after")[1] == ckpt.split("student after")[1]  # the same evaluation


@pytest.fixture(scope="module")
def junk_student(tiny, tmp_path_factory):
    """A copy of the miniature student whose generation_config.json carries foreign sampling settings."""
    folder = tmp_path_factory.mktemp("junk") / "student"
    shutil.copytree(tiny["student"], folder)
    config = json.load(open(folder / "generation_config.json"))
    json.dump(config | JUNK, open(folder / "generation_config.json", "w"))
    return str(folder)


@pytest.fixture(scope="module")
def padded_batch(tiny):
    """8 test prompts, half with a longer query, so the batch is left-padded."""
    samples = data.load_annotations(tiny["test"])[:8]
    samples = [dataclasses.replace(s, query=s.query + " on the screen") if i % 2 else s for i, s in enumerate(samples)]
    model, processor = rollout.load_model(tiny["student"])
    batch = data.encode(processor, samples, data.load_videos(samples)[0])
    assert (batch["attention_mask"] == 0).any(), "the test needs a padded batch"
    return batch


@pytest.mark.parametrize("temperature", [None, 1.0, 0.7])
def test_checkpoint_generation_config_does_not_change_sampling(tiny, junk_student, padded_batch, temperature):
    """Before the fix: the junk config's repetition penalty / top-k / top-p applied while sampling (rollout IoU 0)."""
    outs = []
    for path in (tiny["student"], junk_student):
        model, processor = rollout.load_model(path)
        torch.manual_seed(0)
        outs.append(rollout.generate(model, processor, padded_batch, 24, temperature))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # the checkpoint is untouched
    assert rollout.load_model(junk_student)[0].generation_config.repetition_penalty == 1.8


@pytest.mark.parametrize("student", ["plain", "junk config", "gradient checkpointing, train mode"])
@pytest.mark.parametrize("temperature", [0.7, 3.0])
def test_sampling_distribution_is_the_scored_one_at_every_position(tiny, junk_student, padded_batch, student,
                                                                   temperature, monkeypatch):
    """The distribution generate samples from at temperature T (T != 1) == softmax(completion_logits at T), at
    every real completion position of every row of a left-padded batch; vision tokens have probability 0 in both."""
    model, processor = rollout.load_model(junk_student if student == "junk config" else tiny["student"])
    if student.startswith("gradient"):
        model.gradient_checkpointing_enable()
        model.train()
    real_generate, seen = model.generate, {}

    def recording(**kw):  # the same call, also returning the processed scores of every step
        out = real_generate(**kw, output_scores=True, return_dict_in_generate=True)
        seen["scores"] = out.scores
        return out.sequences
    monkeypatch.setattr(model, "generate", recording)
    forbidden = rollout.forbidden_ids(processor)
    torch.manual_seed(0)
    ids, mask = rollout.generate(model, processor, padded_batch, 24, temperature)
    sampled = torch.log_softmax(torch.stack(seen["scores"], 1).float(), -1)  # [B, T, V]
    with torch.no_grad():
        logits = rollout.completion_logits(model, rollout.append_completion(padded_batch, ids, mask), ids.shape[1],
                                           temperature, forbidden)
    scored = torch.log_softmax(logits, -1)
    real = mask.bool()
    assert padded_batch["attention_mask"].sum(1).unique().numel() > 1  # prompts of different lengths
    assert (real.sum(1) > 2).sum() > real.shape[0] // 2  # most rows compared at several positions
    assert torch.equal(torch.isinf(sampled[real]), torch.isinf(scored[real]))  # the same support
    assert torch.isinf(sampled[real][:, forbidden]).all() and torch.isinf(scored[real][:, forbidden]).all()
    assert not torch.isin(ids[real], torch.tensor(forbidden)).any()
    finite = ~torch.isinf(scored[real])
    assert torch.allclose(sampled[real][finite], scored[real][finite], atol=2e-4)
    # and the match is of the temperature: the same logits at T = 1 are told apart
    at_one = torch.log_softmax(logits * temperature, -1)
    assert (at_one[real][finite] - sampled[real][finite]).abs().max() > 0.5  # measured: 3.4-3.8


def test_bf16_loss_is_close_to_fp32(student_and_rollouts):
    """--bf16 autocasts the forward passes: on the same rollouts its losses are within bf16's precision of fp32."""
    model, teacher, seq, ids, mask, forbidden = student_and_rollouts
    losses = {}
    for bf16 in (False, True):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            s = rollout.completion_logits(model, seq, ids.shape[1], 1.0, forbidden)
            t = rollout.completion_logits(teacher, seq, ids.shape[1], 1.0, forbidden)
        logp = rollout.token_logp(s, ids)
        losses[bf16] = (opd.fullkl_loss(s, t, mask).item(),
                        opd.opd_loss(logp, logp, rollout.token_logp(t, ids), mask).item())
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        raw = model(**seq, logits_to_keep=1).logits
    assert raw.dtype == torch.bfloat16  # autocast did run the model in bf16
    assert s.dtype == torch.float32  # and completion_logits divides by T in fp32, as generate samples
    for fp32, bf16 in zip(losses[False], losses[True]):
        assert bf16 == pytest.approx(fp32, rel=0.03)
        assert abs(fp32) > 0.05  # not two near-zero numbers


@pytest.fixture(scope="module")
def student_and_rollouts(tiny, padded_batch):
    model, processor = rollout.load_model(tiny["student"])
    teacher, _ = rollout.load_model(tiny["teacher"])
    torch.manual_seed(0)
    ids, mask = rollout.generate(model, processor, padded_batch, 24, 1.0)
    seq = rollout.append_completion(padded_batch, ids, mask)
    return model, teacher, seq, ids, mask, rollout.forbidden_ids(processor)


@pytest.mark.parametrize("script", ["opd.py", "grpo.py"])
def test_bf16_and_gradient_checkpointing_run_the_readme_command(tiny, tmp_path, script):
    """The README's real-model flags together, on the miniature: the step runs and tracks the plain run.
    bf16 sampling picks other tokens than fp32 after a few positions, so the rollouts differ; OPD's loss is compared
    as the exact KL (--loss fullkl) over 8 prompts, which such differences move by ~10% (the bug: x5)."""
    common = ("--steps", "1", "--prompts-per-step", "8", "--micro-batch", "4", "--num-workers", "2", *GROUNDING,
              *(("--loss", "fullkl") if script == "opd.py" else ()))
    _run(script, tiny, tmp_path / "plain", *common)
    _run(script, tiny, tmp_path / "gpu", *common, "--bf16", "--gradient-checkpointing")
    (a,), (b,) = _steps(tmp_path / "plain"), _steps(tmp_path / "gpu")
    assert b["rollout_iou"] > 0 and b["rollout_iou"] == pytest.approx(a["rollout_iou"], abs=0.2)
    if script == "opd.py":  # GRPO's loss is ~0 by construction (zero-mean advantages): nothing to compare
        assert b["loss"] == pytest.approx(a["loss"], rel=0.3)


# ----------------------------------------------------------------------------- micro-batch weighting
def _train_one_step(tiny, tmp_path, micro_batch, score, loss_fn, monkeypatch, group=1, token_mean=False):
    """One opd.train step (SGD) on 6 prompts with fixed completions: greedy (batch-independent), each cut to a length
    set by its own prompt, so only the micro-batching differs between calls. -> (log record, final weights)."""
    real_generate = rollout.generate

    def fixed(model, processor, batch, max_new_tokens, temperature=None, features=None):
        ids, mask = real_generate(model, processor, batch, max_new_tokens, features=features)
        keep = 2 + (batch["input_ids"] * batch["attention_mask"]).sum(1) % 5  # 2-6 tokens, set by the prompt
        return ids, mask * (torch.arange(ids.shape[1]) < keep[:, None])
    monkeypatch.setattr(rollout, "generate", fixed)
    student, processor = rollout.load_model(tiny["student"])
    student.train()
    args = opd.Args(student=tiny["student"], data=tiny["train"], out=str(tmp_path / f"mb{micro_batch}"), steps=1,
                    prompts_per_step=6, micro_batch=micro_batch, lr=1e-3, max_new_tokens=8, num_workers=0)
    # plain SGD at lr 1: the weights move by the (clipped) gradient itself. Adam's first step is about lr * sign(g), so
    # a coordinate whose gradient cancels to ~1e-9 moved by +-lr with the float noise of the split (seen on one CPU)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1.0)
    opd.train(args, student, processor, score, loss_fn, group=group, token_mean=token_mean,
              optimizer=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)))
    (record,) = _steps(tmp_path / f"mb{micro_batch}")
    return record, {k: v.detach().clone() for k, v in student.state_dict().items()}


def _assert_same_step(a, b):
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-4)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-4)
    assert all(torch.allclose(a[1][k], b[1][k], atol=1e-6) for k in a[1])


def test_uneven_micro_batches_give_the_gradient_of_one_batch(tiny, teacher, tmp_path, monkeypatch):
    """6 prompts as 4 + 2 == as one batch of 6 (OPD's loss is a mean over sequences). Before the fix the 2 counted
    twice: the loss was (L_4 + L_2) / 2 instead of (4 L_4 + 2 L_2) / 6."""
    t_model, processor = teacher
    forbidden = rollout.forbidden_ids(processor)
    score = lambda seq, ids, mask, *_: {"teacher_logits": rollout.completion_logits(t_model, seq, ids.shape[1], 1.0,
                                                                                    forbidden)}
    loss_fn = lambda logits, ids, mask, old_logp, scored: opd.fullkl_loss(logits, scored["teacher_logits"], mask)
    one = _train_one_step(tiny, tmp_path, 6, score, loss_fn, monkeypatch)
    _assert_same_step(one, _train_one_step(tiny, tmp_path, 4, score, loss_fn, monkeypatch))
    _assert_same_step(one, _train_one_step(tiny, tmp_path, 5, score, loss_fn, monkeypatch))


def test_grpo_token_mean_is_over_the_whole_step(tiny, tmp_path, monkeypatch):
    """GRPO's loss is a mean over all of the step's tokens: rollouts of different lengths, split 4 + 2 prompts (x 2
    rollouts), give the step of one batch. Before the fix each micro-batch took its own token mean."""
    score = lambda seq, ids, mask, ious, chunk, videos: {  # a fixed advantage per prompt, the same for its 2 rollouts
        "advantages": torch.tensor([s.span[0] - 2.5 for s in chunk for _ in range(2)])}
    loss_fn = lambda logits, ids, mask, old_logp, scored: grpo.grpo_loss(rollout.token_logp(logits, ids), old_logp,
                                                                         scored["advantages"], mask)
    one = _train_one_step(tiny, tmp_path, 6, score, loss_fn, monkeypatch, group=2, token_mean=True)
    _assert_same_step(one, _train_one_step(tiny, tmp_path, 4, score, loss_fn, monkeypatch, group=2,
                                           token_mean=True))


def test_off_policy_with_the_sampled_loss_is_refused(tmp_path):
    """The score-function estimator on the teacher's samples is no KL gradient: refused, before any model loads."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "opd.py", "--rollouts", "teacher", "--loss", "sampled", "--out",
                          str(tmp_path / "x")], cwd=opd.__file__.rsplit("/", 1)[0], capture_output=True, text=True,
                         timeout=300)  # before the check, this trained the whole default run
    assert res.returncode != 0 and "--loss fullkl" in res.stderr
    assert not (tmp_path / "x").exists()


def test_prefetch_keeps_a_few_micro_batches_ahead_not_whole_steps(tiny, tiny_processor, tmp_path, monkeypatch):
    """A DataLoader item is one micro-batch, at most one ahead per worker, and its raw frames stay in the worker
    unless `score` needs them. Before: each item was a whole step with its frames, two steps ahead per worker (a
    32-prompt step of 720p clips held hundreds of GB; docs/results.md, "Prefetching")."""
    import time
    from types import SimpleNamespace
    from lib import run
    decoded = tmp_path / "decoded"  # the forked workers inherit the patched function: they append here
    real = data.load_videos

    def counting(chunk, *a, **kw):
        with open(decoded, "a") as f:
            f.write(f"{len(chunk)}\n")
        return real(chunk, *a, **kw)
    monkeypatch.setattr(data, "load_videos", counting)
    args = SimpleNamespace(seed=0, prompts_per_step=4, micro_batch=1, num_workers=2, fps=2.0, max_frames=256,
                           bf16=False, share_prompt=True, steps=20, epochs=0, skip_bad=False)
    samples = data.load_annotations(tiny["train"])
    upcoming = run.prefetch(args, tiny_processor, samples, 1, 0)
    assert len(upcoming) == 20
    mb, chunk, videos, prompt = next(upcoming[0])
    time.sleep(3)  # time for the workers to fill whatever they may hold
    assert sum(int(n) for n in decoded.read_text().split()) <= 3  # the one in use, one ahead per worker
    assert mb == 0 and len(chunk) == 1 and videos is None and "pixel_values_videos" in prompt
    args.bf16 = True
    mb, chunk, videos, prompt = next(run.prefetch(args, tiny_processor, samples, 1, 0, frames=True)[0])
    assert videos is not None and prompt["pixel_values_videos"].dtype == torch.bfloat16


def test_skip_bad_replaces_a_video_that_cannot_be_decoded(tiny, tmp_path):
    """A video that exists but cannot be decoded, hours into a run: with --skip-bad its sample is replaced by
    another (the micro-batch keeps its size on every rank); without, the run ends in a DataError. Before, --skip-bad
    covered missing files only, and the decode error ended the run."""
    from types import SimpleNamespace
    from lib import run
    samples = data.load_annotations(tiny["train"])[:6]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))  # an mp4 header, then nothing decodable
    samples[0] = dataclasses.replace(samples[0], video=str(broken))
    args = SimpleNamespace(fps=2.0, max_frames=256, skip_bad=True)
    chunk, videos = run.decode(args, samples[:2], samples)
    assert chunk[0].video != str(broken) and chunk[1] == samples[1] and all(v is not None for v in videos)
    assert run.decode(args, samples[:2], samples)[0] == chunk  # the same replacement every time
    with pytest.raises(data.DataError, match="broken.mp4"):
        run.decode(SimpleNamespace(fps=2.0, max_frames=256, skip_bad=False), samples[:2], samples)
