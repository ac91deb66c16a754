"""Comparing training runs: their evaluation curves side by side, time-to-target, where a step's time goes.

    python eval.py --compare runs/opd runs/grpo                                   # table, compare.json, compare.png
    python eval.py --compare runs/opd-s{0,1,2} runs/grpo-s{0,1,2} --baseline runs/grpo  # + the paper's time ratio

Reads only the runs' log.jsonl files (opd.train writes them: one record per step, one per evaluation).
"""
import json
import os
import re

import numpy as np

import data


def compare(runs, out="compare", target=None, baseline=None):
    """Runs' log.jsonl -> table (steps, wall, best/final mIoU and R1@0.5, time-to-target) + compare.json/.png.

    Time-to-target, the paper's way (its Fig. 6: OPD's training cost to reach GRPO's accuracy): with `baseline` (a
    configuration: runs named BASELINE-s0, BASELINE-s1, ... or one run BASELINE), the target is the baseline's best
    mIoU, mean over its seeds; each run's time_to_target_s is the training wall-clock (evaluation excluded) at its
    first evaluation at or above it (NaN if never), and compare.json's "ratio" holds, per configuration, the mean
    and std of time_to_target_s / the baseline's mean time_to_target_s over the seeds that reach the target, and
    how many do. With both, `target` is the target (fixed before the runs) and the ratios are over the baseline's
    time to it. Without a baseline the target is `target` (an mIoU) or else the weakest run's best mIoU.
    """
    curves, costs = read_runs(runs)
    base_runs = []
    if baseline is not None:
        base_runs = [r for r in curves if config(r) == baseline.rstrip("/")]
        if not base_runs:
            raise data.DataError(f"--baseline {baseline}: none of the runs is it or one of its seeds (NAME-sN)")
    if target is None and base_runs:
        target = float(np.mean([best(curves[r]) for r in base_runs]))
    elif target is None:
        target = min(best(evals) for evals in curves.values())
    summary = {run: run_summary(evals, target) for run, evals in curves.items()}
    ratio = time_ratios(summary, base_runs, baseline) if baseline is not None else {}
    seeds = print_tables(summary, costs, ratio, baseline, target)
    with open(out + ".json", "w") as f:
        json.dump({"runs": summary, "seeds": seeds, "step_time": costs, "baseline": baseline, "target_mIoU": target,
                   "ratio": ratio}, f, indent=1)
    plot(curves, out)
    return summary


def config(run):
    """Runs NAME-s0, NAME-s1, ... are seeds of the configuration NAME."""
    return re.sub(r"-s\d+$", "", run.rstrip("/"))


def best(evals):
    """The best test mIoU of a run's evaluation records."""
    return max(e["eval"]["mIoU"] for e in evals)


def read_runs(runs):
    """Each run's log.jsonl -> (curves {run: evaluation records}, costs {run: mean seconds per step and its split})."""
    curves, costs = {}, {}
    for run in runs:
        with open(os.path.join(run, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        evals = [r for r in records if "eval" in r]
        if not evals:
            raise SystemExit(f"{run}/log.jsonl has no evaluation records")
        curves[run] = evals
        steps = [r for r in records if "time" in r]
        split = {k: float(np.mean([r["time"][k] for r in steps])) for k in steps[0]["time"]} if steps else {}
        costs[run] = {"s_per_step": sum(split.values()), **{f"{k}_s": v for k, v in split.items()},
                      "other_%": 100 * split.get("other", 0) / max(sum(split.values()), 1e-9),
                      "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steps])) if steps else 0.0}
    return curves, costs


def run_summary(evals, target):
    """One run's row: steps, wall-clock, best and final mIoU / R1@0.5, and when it first reached `target`."""
    hit = next((e for e in evals if e["eval"]["mIoU"] >= target), {"step": float("nan"), "wall": float("nan")})
    return {"steps": evals[-1]["step"], "wall_s": evals[-1]["wall"],
            "best_mIoU": best(evals), "final_mIoU": evals[-1]["eval"]["mIoU"],
            "best_R1@0.5": max(e["eval"]["R1@0.5"] for e in evals), "final_R1@0.5": evals[-1]["eval"]["R1@0.5"],
            "target_mIoU": target, "target_step": hit["step"], "time_to_target_s": hit["wall"]}


def mean_std(values):
    """Mean and std over the seeds that have a value (NaN: never reached); NaN, not a warning, when none has."""
    kept = [v for v in values if v == v]
    return (float(np.mean(kept)), float(np.std(kept))) if kept else (float("nan"), float("nan"))


def time_ratios(summary, base_runs, baseline):
    """Per configuration: mean and std over its seeds of time_to_target_s / the baseline's mean, and how many
    seeds reach the target at all (a seed that never does is counted, not averaged)."""
    base_time, _ = mean_std([summary[r]["time_to_target_s"] for r in base_runs])
    if base_time != base_time:
        print(f"no seed of {baseline} reaches the target: no ratio (NaN)")
    if base_time == 0:  # its best is its start (step 0): every run is "there" at 0 s
        print(f"{baseline}'s best mIoU is its start: there is no time to it, so no ratio (NaN)")
    ratio = {}
    for name in dict.fromkeys(config(r) for r in summary):
        times = [summary[r]["time_to_target_s"] for r in summary if config(r) == name]
        mean, std = mean_std([t / base_time for t in times]) if base_time > 0 else (float("nan"), float("nan"))
        ratio[name] = {"mean": mean, "std": std, "reached": sum(t == t for t in times), "seeds": len(times)}
    return ratio


def print_tables(summary, costs, ratio, baseline, target):
    """Print the runs, their step-time split, the mean ± std over seeds and the time ratios -> the seeds table."""
    width = max(len(r) for r in summary) + 2

    def show(name, table, cell):  # {row: {column: value}} -> aligned text, one line per row
        print(f"{name:<{width}}" + "".join(f"{c:>14}" for c in next(iter(table.values()))))
        for row, values in table.items():
            print(f"{row:<{width}}" + "".join(cell(v) for v in values.values()))

    show("run", summary, lambda v: f"{v:14.1f}")
    print("\nwhere a training step's time goes (mean seconds per step)")
    show("run", costs, lambda v: f"{v:14.3f}")
    groups = {}
    for run, row in summary.items():
        groups.setdefault(config(run), []).append(row)
    cols = list(next(iter(summary.values())))
    seeds = {g: {k: mean_std([r[k] for r in rows]) for k in cols} for g, rows in groups.items() if len(rows) > 1}
    if seeds:
        print("\nmean ± std over seeds")
        show("config", seeds, lambda v: f"{v[0]:8.1f} ±{v[1]:4.1f}")
    if ratio:
        print(f"\ntime to mIoU {target:.1f}, over {baseline}'s time to it (mean ± std over seeds; NaN: never)")
        for name, r in ratio.items():
            print(f"{name:<{width}}{r['mean']:8.2f} ±{r['std']:5.2f}   "
                  f"({r['reached']} of {r['seeds']} seeds reach it)")
    return seeds


def plot(curves, out):
    """OUT.png: test mIoU against optimizer step and against training wall-clock, one line per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table only, no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, evals in curves.items():
        for ax, x in zip(axes, ("step", "wall")):
            ax.plot([e[x] for e in evals], [e["eval"]["mIoU"] for e in evals], marker=".", label=run)
    for ax, label in zip(axes, ("optimizer step", "training wall-clock (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("test mIoU")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    print(f"wrote {out}.json and {out}.png")
