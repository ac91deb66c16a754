"""Query-reading pilot (2026-12-07 night; docs/LOG.md): not part of the project, kept to rerun. Two-event clips, each
event its own query; SFT with toy's own functions; every EVERY steps: validation mIoU, mIoU against the clip's other
event, share of clips whose two answers differ. Switches (env): PAIRED=1 both queries of a clip in one batch;
CAPTION=share a captioning task on that share of the batch; FIXQ=1 each colour in a fixed quadrant; TEXTFIRST=1 the
query before the video; MODEL_SEED, LR, NCLIPS, EVERY.
usage, from the project root: python docs/pilots/query_levers.py OUT STEPS HIDDEN LAYERS VHIDDEN DEPTH WEIGHT_DECAY"""
import dataclasses, json, os, random, sys, time
import torch
sys.path.insert(0, os.environ.get("PROJECT", "."))
import data, eval as ev
from lib import miniature as toy, miniature_clips
out, steps = sys.argv[1], int(sys.argv[2])
size = tuple(int(x) for x in sys.argv[3:7])
wd = float(sys.argv[7])
paired = int(os.environ.get("PAIRED", 0)); caption = float(os.environ.get("CAPTION", 0))
n_clips = int(os.environ.get("NCLIPS", 3000)); every = int(os.environ.get("EVERY", 250))
orig_pm = data.prompt_messages
def pm(query, feedback=None):
    if query.startswith("@"):
        return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": query[1:]}]}]
    if os.environ.get("TEXTFIRST"):
        return [{"role": "user", "content": [{"type": "text", "text": data.PROMPT.format(query=query)}, {"type": "video"}]}]
    return orig_pm(query, feedback)
data.prompt_messages = pm
if os.environ.get("FIXQ"):
    import inspect
    src = inspect.getsource(miniature_clips.make_clip).replace("quadrants = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], cfg.shapes)",
        "quadrants = [{'red': (0, 0), 'green': (0, 1), 'blue': (1, 0)}[c] for c in colours]")
    assert "'red': (0, 0)" in src
    ns = dict(vars(miniature_clips)); exec(src, ns); miniature_clips.make_clip = ns["make_clip"]
cfg = toy.ToyConfig(shapes=2, n_train=n_clips, n_val=64, n_test=0, teacher=size, seed=0)
os.makedirs(f"{out}/videos", exist_ok=True)
rng = random.Random(0)
def clips(split, n):
    s = []
    for i in range(n):
        p = f"{out}/videos/{split}{i:05d}.mp4"
        for j, (q, span) in enumerate(miniature_clips.make_clip(p, rng, cfg)):
            s.append(data.Sample(p, q, span, float(cfg.seconds), f"{split}{i}#{j}"))
    return s
t0 = time.time()
train, val = clips("train", cfg.n_train), clips("val", cfg.n_val)
proc = toy.make_processor(f"{out}/processor", cfg)
load = lambda ss: [data.load_video(x.video) for x in ss]
tv, vv = load(train), load(val)
print(f"data {time.time()-t0:.0f}s: {len(train)} train samples", flush=True)
model = toy.make_model(proc, size, int(os.environ.get("MODEL_SEED", 5)))
def probe(model):
    model.eval()
    ans = toy.greedy_answers(model, proc, val, vv)
    preds = [data.parse_span(a) for a in ans]
    m = ev.compute_metrics(preds, [s.span for s in val])
    differ = sum(ans[i] != ans[i + 1] for i in range(0, len(ans), 2)) / (len(ans) // 2) * 100
    other = ev.compute_metrics(preds, [val[i ^ 1].span for i in range(len(val))])["mIoU"]
    return dict(mIoU=round(m["mIoU"], 1), other_mIoU=round(other, 1), differ=round(differ, 1), distinct=len(set(ans)))
def caption_items(samples, videos):
    items = []
    for i in range(0, len(samples), 64):
        part = [dataclasses.replace(s, query=f"@Which object is visible from {s.span[0]:.1f} to {s.span[1]:.1f} seconds?") for s in samples[i:i+64]]
        b = data.encode(proc, part, videos[i:i + 64], answers=[s.query for s in samples[i:i+64]])
        b["labels"] = toy.answer_labels(proc, b)
        pixels = b["pixel_values_videos"].split(b["video_grid_thw"].prod(1).tolist())
        for j, n in enumerate(b["attention_mask"].sum(1).tolist()):
            items.append({k: b[k][j, :n] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels")}
                         | {"pixel_values_videos": pixels[j], "video_grid_thw": b["video_grid_thw"][j]})
    return items
class Sampler(random.Random):
    def sample(self, population, k):
        n = len(train)
        out = []
        while len(out) < k:
            base = n if (caption and self.random() < caption) else 0
            if paired:
                c = self.randrange(n // 2); out += [base + 2 * c, base + 2 * c + 1]
            else:
                out.append(base + self.randrange(n))
        return out[:k]
log = open(f"{out}/log.jsonl", "w")
orig_adamw = torch.optim.AdamW
torch.optim.AdamW = lambda params, **kw: orig_adamw(params, **(kw | {"weight_decay": wd}))
cfg2 = dataclasses.replace(cfg, lr=float(os.environ.get("LR", cfg.lr)))
_, done, state = toy.sft(model, proc, train, tv, steps, cfg2, "pilot", until=1)
state["rng"] = Sampler(0)
if caption:
    state["items"] = state["items"] + caption_items(train, tv)
    state["judged"] = state["items"]
print("items", len(state["items"]), flush=True)
for until in range(every, steps + 1, every):
    _, done, state = toy.sft(model, proc, train, tv, steps, cfg2, "pilot", until=until, state=state)
    r = dict(step=until, wall=round(time.time() - t0), **probe(model))
    print(json.dumps(r), flush=True); log.write(json.dumps(r) + "\n"); log.flush()
