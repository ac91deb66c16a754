"""--lora-rank (lib/lora.py): adapters start as the full model does, learn, save a merged model and peft adapters,
resume, are refused under torchrun, and are counted by memory.estimate."""
import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import data
import opd
import rollout
from lib import cli, fsdp, lora, memory, run
from test_opd import ROOT, _run, _weights

pytest.importorskip("peft")
# the miniature's adapters at rank 8 learn at this lr; a higher one diverges (docs/results.md, "Adapters")
LORA_LR = "3e-3"


def _args(tiny, tmp_path, **kw):
    return opd.Args(student=tiny["student"], teacher=tiny["teacher"], data=tiny["train"], out=str(tmp_path / "run"),
                    prompts_per_step=4, micro_batch=4, max_new_tokens=8, num_workers=0, temperature=1.0, **kw)


def test_adapters_start_where_the_full_fine_tune_does(tiny, tmp_path):
    """Step 0 with adapters (B = 0) is step 0 of the full fine-tune: the same rollouts, token for token, the same
    log-probs of them, and the teacher's scores of the same tokens; only the adapters are trainable."""
    full_args, lora_args = _args(tiny, tmp_path), _args(tiny, tmp_path, lora_rank=8)
    samples = data.load_samples(tiny["train"])
    prepared = run.prepare(full_args, rollout.load_model(tiny["student"])[1], 1, False, samples, (0, samples[:4]))
    outs = []
    for args in (full_args, lora_args):
        student, processor = opd.load_student(args)
        teacher, vocab = opd.load_teacher(args, student, processor)
        score, _ = opd.distillation(args, teacher, vocab, rollout.forbidden_ids(processor))
        (r,) = opd.collect(args, student, processor, [prepared], score, 0, dict(generate=0.0, teacher=0.0))
        logits = rollout.completion_logits(student, r["seq"], r["ids"].shape[1], args.temperature,
                                           rollout.forbidden_ids(processor))
        outs.append((r["ids"], rollout.token_logp(logits, r["ids"]), r["scored"]["teacher_logp"]))
        trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    assert trainable and all("lora_" in n and ".language_model.layers." in n for n in trainable)
    assert memory.adapters(memory.model_size(tiny["student"]), 8) == sum(
        p.numel() for p in student.parameters() if p.requires_grad)


def test_a_lora_run_saves_a_merged_model_and_adapters_and_resumes(tiny, tmp_path):
    """final/ is a plain model (eval.py loads it) whose weights differ from the base student only in the targeted
    linear layers, and it equals the base with final/adapter loaded by peft; 1 step + --resume == 2 steps."""
    flags = ("--lora-rank", "4", "--lr", "1e-2", "--loss", "fullkl")
    _run("opd.py", tiny, tmp_path / "full", "--steps", "2", *flags)
    _run("opd.py", tiny, tmp_path / "split", "--steps", "1", *flags)
    _run("opd.py", tiny, tmp_path / "split", "--steps", "2", "--resume", *flags)
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "split" / "final")
    base = _weights(tiny["student"])
    assert a.keys() == base.keys()
    changed = {k for k in a if not torch.equal(a[k], base[k])}
    assert changed and all(re.fullmatch(lora.TARGETS, k.removesuffix(".weight")) for k in changed)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # peft's own loader on the saved adapters gives the merged model's weights
    from peft import PeftModel
    model = AutoModelForImageTextToText.from_pretrained(tiny["student"])
    merged = PeftModel.from_pretrained(model, str(tmp_path / "full" / "final" / "adapter")).merge_and_unload()
    for k, v in merged.state_dict().items():
        if k in a:
            assert torch.allclose(v, a[k], atol=1e-6), k
    res = subprocess.run([sys.executable, "eval.py", "--model", str(tmp_path / "full" / "final"), "--data",
                          tiny["test"], "--out", str(tmp_path / "eval")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "mIoU" in json.load(open(tmp_path / "eval" / "metrics.json")), res.stderr[-2000:]


def test_lora_learns_on_the_miniature(shipped, tmp_path):
    """The shipped miniature's student, adapters of rank 8 only: the OPD run lowers the reverse KL to the teacher on
    its own rollouts and raises its greedy test mIoU."""
    out = tmp_path / "run"
    cmd = [sys.executable, "opd.py", "--out", str(out), "--lora-rank", "8", "--lr", LORA_LR, "--steps", "100",
           "--eval-every", "0", "--eval-limit", "64"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    kl = [r["kl"] for r in log if "kl" in r]
    before, after = [r["eval"]["mIoU"] for r in log if "eval" in r]
    # the margin measured on the miniature shipped 2026-12-07 (docs/LOG.md)
    assert sum(kl[-10:]) < 0.8 * sum(kl[:10]), kl
    assert after > before + 3, (before, after)


def test_lora_is_refused_under_torchrun_and_on_resuming_the_other_kind(tiny, tmp_path, monkeypatch):
    """One line each: adapters under torchrun, and --resume of a run trained the other way (the optimizer state of
    adapters cannot continue a full fine-tune, nor the reverse)."""
    with monkeypatch.context() as m:
        m.setattr(fsdp, "world", lambda: 2)
        with pytest.raises(data.DataError, match="--lora-rank trains adapters in one process"):
            cli.start_run(_args(tiny, tmp_path, lora_rank=8))
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "step.json").write_text('{"step": 1}')
    with pytest.raises(data.DataError, match="trained without --lora-rank: resume it the same way"):
        cli.start_run(_args(tiny, tmp_path, lora_rank=8, resume=True, steps=2))
    (checkpoint / lora.ADAPTER).mkdir()
    with pytest.raises(data.DataError, match="trained with --lora-rank: resume it the same way"):
        cli.start_run(_args(tiny, tmp_path, resume=True, steps=2))


def test_the_estimate_counts_adapters_not_full_weights(tiny, tmp_path):
    """Adapters: AdamW state and gradients for the adapters only, the frozen weights in the run's dtype."""
    full = dataclasses.asdict(_args(tiny, tmp_path))
    sizes = memory.model_size(tiny["student"])
    for bf16 in (False, True):
        a = memory.estimate(opd.Args(**full | dict(bf16=bf16)), cuda=False)
        b = memory.estimate(opd.Args(**full | dict(bf16=bf16, lora_rank=8)), cuda=False)
        adapters = memory.adapters(sizes, 8)
        assert b["AdamW moments"] == 8 * adapters < a["AdamW moments"]
        assert b["student weights"] == (2 if bf16 else 4) * sizes["params"] + 4 * adapters
        assert b["student fwd+bwd"] < a["student fwd+bwd"]


def test_adapters_that_do_not_fit_are_refused_on_resume(tiny, tmp_path):
    """Saved adapters of another rank, or missing some layers, are one line, not zeros left in place."""
    from safetensors.torch import save_file
    args = _args(tiny, tmp_path, lora_rank=4)
    student, processor = rollout.load_model(tiny["student"])
    lora.save(lora.add(student, args), processor, str(tmp_path / "saved"))
    adapter = tmp_path / "saved" / lora.ADAPTER
    with pytest.raises(data.DataError, match="adapters have rank 4, not --lora-rank 8"):
        lora.add(rollout.load_model(tiny["student"])[0], _args(tiny, tmp_path, lora_rank=8), str(adapter))
    state = load_file(adapter / "adapter_model.safetensors")
    save_file(dict(list(state.items())[2:]), adapter / "adapter_model.safetensors")  # one layer's A and B gone
    with pytest.raises(data.DataError, match="do not match this model's"):
        lora.add(rollout.load_model(tiny["student"])[0], args, str(adapter))
