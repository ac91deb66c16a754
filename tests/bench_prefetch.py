"""The prefetch queue's host memory at real sizes: peak resident memory of the main process and its DataLoader
workers, plus /dev/shm, while the workers fill their queues (docs/results.md, "Prefetching").

    python tests/bench_prefetch.py                       # this checkout
    python tests/bench_prefetch.py --root ../old         # another checkout of the project (e.g. commit 579c8e7)
    python tests/bench_prefetch.py --clip-seconds 180 --prompts 32 --workers 4   # the issue's size

A 30 s 1280x720 clip (generated once in --work), 8-prompt steps, --micro-batch 1, --num-workers 2, 2 fps, the real
Qwen3-VL video processor settings (tests/bench_real_dims.py); the flags change the clip's length and the
step. Resident memory counts the pages the forked workers
share once per process: the same way for any checkout.
"""
import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))


def make_inputs(work, clip_seconds=30):
    """A clip of `clip_seconds`, the real processor and 64 queries on the clip, in `work` (made once) -> annotations."""
    import av
    import numpy as np
    sys.path.insert(0, HERE)
    import bench_real_dims as bench
    import data
    clip = os.path.join(work, "clip720.mp4" if clip_seconds == 30 else f"clip720-{clip_seconds:g}s.mp4")
    if not os.path.exists(clip):
        with av.open(clip, "w") as out:
            stream = out.add_stream("libx264", rate=4)
            stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
            base = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
            for i in range(int(4 * clip_seconds)):
                for pkt in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, i * 8, axis=1), format="rgb24")):
                    out.mux(pkt)
            for pkt in stream.encode():
                out.mux(pkt)
    bench.make_processor(os.path.join(work, "processor"))
    train = os.path.join(work, f"train-{clip_seconds:g}s.jsonl")
    data.write_jsonl([data.Sample(clip, f"q{i}", (1.0, 5.0), float(clip_seconds), f"c#{i}") for i in range(64)], train)
    return train


def host_memory():
    """(resident bytes of this process and its children, bytes used in /dev/shm)."""
    page = os.sysconf("SC_PAGE_SIZE")
    pids = [os.getpid()] + [int(p) for p in subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True,
                                                           text=True).stdout.split()]
    rss = 0
    for pid in pids:
        try:
            rss += int(open(f"/proc/{pid}/statm").read().split()[1]) * page
        except OSError:
            pass
    return rss, shutil.disk_usage("/dev/shm").used


def measure(root, work, seconds, train, prompts=8, workers=2):
    """Start the checkout's prefetch of `prompts`-prompt steps with `workers` workers, take the first step, and sample
    memory for `seconds`."""
    sys.path.insert(0, root)
    os.chdir(root)
    from transformers import AutoProcessor
    import data
    processor = AutoProcessor.from_pretrained(os.path.join(work, "processor"))
    samples = data.load_annotations(train)
    args = SimpleNamespace(seed=0, prompts_per_step=prompts, micro_batch=1, num_workers=workers, fps=2.0,
                           max_frames=768, bf16=False, share_prompt=True, steps=8, epochs=0, skip_bad=False)
    peak, done = [0, 0, 0], []

    def sample():
        while not done:
            rss, shm = host_memory()
            peak[:] = max(peak, [rss + shm, rss, shm])
            time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()
    tic = time.time()
    if os.path.exists(os.path.join(root, "lib", "run.py")):
        from lib import run
        first = [None for _ in run.prefetch(args, processor, samples, 1, 0)[0]]  # one at a time, as the loop uses them
    else:  # before the plumbing moved to lib/: opd.prefetch, whole steps
        import opd
        first = next(opd.prefetch(args, processor, samples, 1, 0))
    ready = time.time() - tic
    time.sleep(seconds)
    done.append(True)
    gib = lambda n: f"{n / 2 ** 30:.2f}"
    print(f"{root}: first step ({len(first)} micro-batches) ready after {ready:.1f} s; peak RSS + /dev/shm "
          f"{gib(peak[0])} GiB (RSS {gib(peak[1])}, /dev/shm {gib(peak[2])})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.dirname(HERE), help="the checkout whose prefetch runs")
    p.add_argument("--work", default="runs/bench_prefetch", help="where the clip and processor are made")
    p.add_argument("--seconds", type=float, default=60, help="how long the workers may fill their queues")
    p.add_argument("--clip-seconds", type=float, default=30, help="the generated 720p clip's length")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (--num-workers)")
    a = p.parse_args()
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    train = make_inputs(work, a.clip_seconds)
    measure(os.path.abspath(a.root), work, a.seconds, train, a.prompts, a.workers)
