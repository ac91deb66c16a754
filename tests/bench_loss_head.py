"""Peak memory of the loss head: completion-only logits (rollout.completion_logits) vs full-sequence logits.

    python tests/bench_loss_head.py [--prompt-tokens 2048] [--vocab 151936] [--completion 64] [--loss sampled]

A tiny Qwen3-VL with Qwen's real vocabulary size (151,936 rows) reads a ~2k-token video prompt plus a completion;
each variant runs forward + backward in its own process and reports the growth of the process's peak resident
memory over the step. Full logits cost B x L x V x 4 bytes (x2 for the log-softmax); completion-only logits cost
B x (T + 1) x V. --loss sampled: the log-prob of the sampled tokens (Eq. 6's head); --loss fullkl: opd.fullkl_loss
against a teacher pass (the same model, no grad, through the same variant), the loss the miniature trains with.
Prints one JSON line.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one(variant, prompt_tokens, vocab, completion, workdir, loss="sampled"):
    """Run in a fresh process: build the model and batch, then measure one forward + backward."""
    import numpy as np
    import torch
    import data
    import rollout
    import opd
    from lib import miniature
    cfg = miniature.ToyConfig.reduced()
    processor = miniature.make_processor(os.path.join(workdir, "processor"), cfg)
    model = miniature.make_model(processor, cfg.student, 0)
    model.resize_token_embeddings(vocab)
    pairs = max(1, prompt_tokens // 10)  # a 64x64 frame pair costs 4 video tokens + ~6 stamp tokens
    frames = np.zeros((2 * pairs, cfg.frame, cfg.frame, 3), np.uint8)
    meta = {"total_num_frames": 2 * pairs, "fps": 2.0, "frames_indices": list(range(2 * pairs)), "duration": pairs}
    batch = data.encode(processor, [data.Sample("x.mp4", "the red circle", (0, 1), None, "x")], [(frames, meta)])
    ids = torch.randint(100, 300, (1, completion))  # ordinary text tokens (the specials come first)
    seq = rollout.append_completion(batch, ids, torch.ones_like(ids))
    forbidden = [0]

    def head():
        if variant == "completion":
            return rollout.completion_logits(model, seq, completion, 1.0, forbidden)
        return model(**seq, use_cache=False).logits[:, -completion - 1:-1]  # the naive way: all, then a slice
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if loss == "fullkl":
        with torch.no_grad():  # the teacher's scoring pass of opd.train (a second copy would only add weights)
            teacher = head()
        opd.fullkl_loss(head(), teacher, torch.ones_like(ids, dtype=torch.float)).backward()
    else:
        rollout.token_logp(head(), ids).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "loss": loss, "sequence_tokens": seq["input_ids"].shape[1],
                      "peak_growth_mb": round((peak - before) / 1024, 1)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=2048, help="approximate video prompt length")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary rows of the LM head")
    p.add_argument("--completion", type=int, default=64, help="completion tokens")
    p.add_argument("--loss", choices=("sampled", "fullkl"), default="sampled",
                   help="sampled: log-probs of the completion's tokens | fullkl: full-vocabulary KL to a teacher pass")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="/tmp/bench_loss_head", help="scratch folder")
    a = p.parse_args()
    if a.variant:
        return one(a.variant, a.prompt_tokens, a.vocab, a.completion, a.workdir, a.loss)
    rows = {}
    for variant in ("full", "completion"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--prompt-tokens", str(a.prompt_tokens),
                              "--vocab", str(a.vocab), "--completion", str(a.completion), "--workdir", a.workdir,
                              "--loss", a.loss],
                             capture_output=True, text=True, check=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    ratio = rows["full"]["peak_growth_mb"] / max(rows["completion"]["peak_growth_mb"], 1e-3)
    print(json.dumps({**{k: v["peak_growth_mb"] for k, v in rows.items()},
                      "sequence_tokens": rows["full"]["sequence_tokens"], "vocab": a.vocab, "loss": a.loss,
                      "ratio": round(ratio, 1)}))


if __name__ == "__main__":
    main()
