"""Write a synthetic spatial dataset to disk.

    python -m training.data.synth --out DIR --num-scenes N --views-per-scene K --seed S --split train

Layout under DIR/<split>/:
    scenes/scene_000000/view_00/{rgb,depth,class,instance,seg}.png + meta.json
    scenes/scene_000000/{questions,sft,rl,stage1}.jsonl + stats.json
    questions.jsonl, Interleaved_SFT.jsonl, RL_data.jsonl, stage1.jsonl   (merged, scene order)
    manifest.json   frames in order with intrinsics (fx, fy, cx, cy, width, height) and pose
    card.md, card.json, depth_hist.png, distance_hist.png, categories.png
Every scene is a pure function of (seed, split, scene index), so runs are reproducible and splits
never share a scene. A scene is built in a temporary directory and renamed into place when
complete, so an interrupted run resumes by skipping finished scenes with nothing half-written; the
merged files are rebuilt from the scene directories, so nothing is ever duplicated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .questions import make_questions
from .traces import TRACE_MODES, rl_row, sft_trace, stage1_files, stage1_rows

MERGED = {"questions.jsonl": "questions.jsonl", "sft.jsonl": "Interleaved_SFT.jsonl",
          "rl.jsonl": "RL_data.jsonl", "stage1.jsonl": "stage1.jsonl"}
DEPTH_BINS = np.linspace(0.0, 12.0, 49)  # 25 cm bins for the card's depth histogram

_builder = None  # one PyBullet client per worker process


def scene_seed(seed: int, split: str, index: int, stream: int) -> np.random.SeedSequence:
    """Independent streams per (seed, split, scene, purpose); crc32 keeps split names stable."""
    return np.random.SeedSequence(seed, spawn_key=(zlib.crc32(split.encode()), index, stream))


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_scene(root: Path, index: int, cfg: dict) -> str:
    """Generate, annotate and write one scene atomically; returns the scene directory name."""
    global _builder
    from .scene import SceneBuilder, generate_scene  # imported in the worker: PyBullet per process

    if _builder is None:
        _builder = SceneBuilder()
    name = f"scene_{index:06d}"
    final = root / "scenes" / name
    if final.exists():
        return name
    tmp = root / "scenes" / f".tmp_{name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    samples = generate_scene(_builder, scene_seed(cfg["seed"], cfg["split"], index, 0), cfg["views"],
                             cfg["width"], cfg["height"], f"{cfg['split']}_{name}")
    rng = np.random.default_rng(scene_seed(cfg["seed"], cfg["split"], index, 1))
    # The other modes' traces draw from their own stream, so adding them leaves the rest unchanged.
    modes_rng = np.random.default_rng(scene_seed(cfg["seed"], cfg["split"], index, 2))
    other_modes = [m for m in cfg["trace_modes"] if m != "interleave"]
    tally: Counter = Counter()  # the scene's questions per category / answer, for balance
    rows = {k: [] for k in MERGED}
    stats = {"classes": {}, "depth_hist": np.zeros(len(DEPTH_BINS) - 1, np.int64), "depth_over": 0,
             "camera_distances": [], "object_distances": []}
    for v, s in enumerate(samples):
        view = f"view_{v:02d}"
        rel = f"scenes/{name}/{view}"
        s.questions = make_questions(s, rng, cfg["questions"], tally)
        s.save(tmp / view)
        for fname, img in stage1_files(s).items():
            Image.fromarray(img).save(tmp / view / fname)
        rows["questions.jsonl"] += [dict(q, image=f"{rel}/rgb.png") for q in s.questions]
        rows["rl.jsonl"] += [rl_row(s, q, f"{rel}/rgb.png") for q in s.questions]
        for q in _trace_choice(s.questions, cfg["traces"], rng):
            rows["sft.jsonl"] += [sft_trace(s, q, rng)] + [sft_trace(s, q, modes_rng, m) for m in other_modes]
        rows["stage1.jsonl"] += stage1_rows(s, rel)
        d = s.depth[np.isfinite(s.depth)]
        stats["depth_hist"] += np.histogram(d, DEPTH_BINS)[0]
        stats["depth_over"] += int((d >= DEPTH_BINS[-1]).sum())
        visible = [o for o in s.objects if o.pixels > 0]
        for o in visible:
            stats["classes"][o.class_name] = stats["classes"].get(o.class_name, 0) + 1
            stats["camera_distances"].append(round(float(np.linalg.norm(o.centre)), 3))
        for i, a in enumerate(visible):
            for b in visible[i + 1:]:
                stats["object_distances"].append(round(float(np.linalg.norm(np.subtract(a.centre, b.centre))), 3))
    for fname, r in rows.items():
        _write_jsonl(tmp / fname, r)
    stats["depth_hist"] = stats["depth_hist"].tolist()
    (tmp / "stats.json").write_text(json.dumps(stats))
    os.rename(tmp, final)  # atomic: the scene appears complete or not at all
    return name


def _trace_choice(questions: list[dict], k: int, rng: np.random.Generator) -> list[dict]:
    """k questions taken round-robin over tools (depth / segmentation / none), starting from a
    random tool, so the traces are balanced across tools."""
    groups: dict = {}
    for q in questions:
        groups.setdefault(q["tool"], []).append(q)
    queues = [g for _, g in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    picked: list[dict] = []
    while len(picked) < k and any(queues):
        for g in queues:
            if g and len(picked) < k:
                picked.append(g.pop(0))
    return picked


def _task(args):
    return write_scene(*args)


def merge(root: Path) -> list[str]:
    """Rebuild the split-level jsonl files from the finished scenes (sorted, so order is stable)."""
    scenes = sorted(p.name for p in (root / "scenes").iterdir() if p.name.startswith("scene_"))
    for part, merged in MERGED.items():
        tmp = root / f".{merged}.tmp"
        with open(tmp, "w") as out:
            for name in scenes:
                with open(root / "scenes" / name / part) as f:
                    shutil.copyfileobj(f, out)
        os.replace(tmp, root / merged)
    write_manifest(root, scenes)
    return scenes


def write_manifest(root: Path, scenes: list[str]) -> None:
    """Frames in order with their intrinsics and pose: what a camera player (the ROS demo) needs."""
    frames = []
    for name in scenes:
        for view in sorted((root / "scenes" / name).glob("view_*")):
            meta = json.loads((view / "meta.json").read_text())
            rel = view.relative_to(root).as_posix()
            frames.append({"sample_id": meta["sample_id"], "rgb": f"{rel}/rgb.png", "depth": f"{rel}/depth.png",
                           "depth_scale": meta["depth_png_scale"], **meta["intrinsics"],
                           "cam_to_world": meta["cam_to_world"]})
    (root / "manifest.json").write_text(json.dumps({"frames": frames}, indent=1))


def write_card(root: Path, scenes: list[str], cfg: dict) -> dict:
    """Dataset card: counts per class / category / form / answer / flag, and histogram plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes: dict[str, int] = {}
    depth_hist = np.zeros(len(DEPTH_BINS) - 1, np.int64)
    depth_over = 0
    cam_d, obj_d = [], []
    for name in scenes:
        st = json.loads((root / "scenes" / name / "stats.json").read_text())
        for c, n in st["classes"].items():
            classes[c] = classes.get(c, 0) + n
        depth_hist += np.array(st["depth_hist"])
        depth_over += st["depth_over"]
        cam_d += st["camera_distances"]
        obj_d += st["object_distances"]

    def tally(path, key):
        counts: dict[str, int] = {}
        with open(root / path) as f:
            for line in f:
                k = key(json.loads(line))
                counts[k] = counts.get(k, 0) + 1
        return dict(sorted(counts.items()))

    card = {
        "config": cfg, "scenes": len(scenes), "views": len(scenes) * cfg["views"],
        "object_instances_per_class": dict(sorted(classes.items())),
        "questions_per_category": tally("questions.jsonl", lambda q: q["category"]),
        "questions_per_form": tally("questions.jsonl", lambda q: q["form"]),
        "choice_and_yesno_answers": tally("questions.jsonl", lambda q: f"{q['form']}:{q['answer']}"
                                          if q["form"] != "numeric" else "numeric"),
        "sft_traces_per_tool": tally("Interleaved_SFT.jsonl", lambda r: str(r["tool"])),
        "sft_traces_per_mode": tally("Interleaved_SFT.jsonl", lambda r: r.get("mode", "interleave")),
        "rl_flags": tally("RL_data.jsonl", lambda r: r["flag"]),
        "depth_pixels_beyond_12m": depth_over,
    }
    (root / "card.json").write_text(json.dumps(card, indent=1))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(DEPTH_BINS[:-1], depth_hist, width=np.diff(DEPTH_BINS), align="edge")
    ax.set(xlabel="depth (m)", ylabel="pixels", title="Depth of all valid pixels")
    fig.tight_layout()
    fig.savefig(root / "depth_hist.png", dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([cam_d, obj_d], bins=30, label=["camera to object", "object to object"])
    ax.set(xlabel="distance between box centres (m)", ylabel="count", title="Distances")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "distance_hist.png", dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    cats = card["questions_per_category"]
    ax.bar(list(cats), list(cats.values()))
    ax.tick_params(axis="x", rotation=45)
    ax.set(ylabel="questions", title="Questions per category")
    fig.tight_layout()
    fig.savefig(root / "categories.png", dpi=80)
    plt.close(fig)

    def table(title, d):
        return [f"### {title}", "", "| key | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in d.items()] + [""]

    lines = [f"# Synthetic spatial dataset: split `{cfg['split']}`", "",
             f"{card['scenes']} scenes x {cfg['views']} views at {cfg['width']}x{cfg['height']}, seed {cfg['seed']}. "
             "Generated by `python -m training.data.synth`; ground truth is exact (PyBullet render).",
             "Numeric answers are scored within 25% relative error, counts exactly "
             "(see `training/data/questions.py`).",
             "Blind baselines (what the text and options alone give away) are added by "
             "`python -m training.data.baselines --train TRAIN_SPLIT --test THIS_SPLIT --card`.", "",
             "![depth](depth_hist.png) ![distances](distance_hist.png) ![categories](categories.png)", ""]
    for key in ("object_instances_per_class", "questions_per_category", "questions_per_form",
                "choice_and_yesno_answers", "sft_traces_per_tool", "sft_traces_per_mode", "rl_flags"):
        lines += table(key.replace("_", " "), card[key])
    (root / "card.md").write_text("\n".join(lines))
    return card


def generate(out: str, num_scenes: int, views: int, seed: int, split: str, width: int = 320,
             height: int = 240, questions: int = 8, traces: int = 3, workers: int = 2,
             progress: bool = True, trace_modes: tuple[str, ...] = TRACE_MODES) -> dict:
    if unknown := set(trace_modes) - set(TRACE_MODES):
        raise ValueError(f"trace modes {sorted(unknown)} are not among {TRACE_MODES}")
    root = Path(out) / split
    (root / "scenes").mkdir(parents=True, exist_ok=True)
    for leftover in (root / "scenes").glob(".tmp_*"):  # debris of an interrupted run
        shutil.rmtree(leftover)
    cfg = {"seed": seed, "split": split, "views": views, "width": width, "height": height,
           "questions": questions, "traces": traces, "trace_modes": list(trace_modes)}
    todo = [i for i in range(num_scenes) if not (root / "scenes" / f"scene_{i:06d}").exists()]
    args = [(root, i, cfg) for i in todo]
    bar = tqdm(total=num_scenes, initial=num_scenes - len(todo), unit="scene", disable=not progress)
    if workers > 1 and len(todo) > 1:
        # fork is safe: the parent never opens a PyBullet client (workers create theirs lazily),
        # and it spares each worker re-importing the model package.
        with mp.get_context("fork").Pool(min(workers, len(todo))) as pool:
            for _ in pool.imap_unordered(_task, args):
                bar.update()
    else:
        for a in args:
            _task(a)
            bar.update()
    bar.close()
    scenes = merge(root)
    return write_card(root, scenes, cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-scenes", type=int, required=True)
    ap.add_argument("--views-per-scene", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="train")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--questions-per-view", type=int, default=8)
    ap.add_argument("--traces-per-view", type=int, default=3, help="SFT traces per view (base64 images)")
    ap.add_argument("--trace-modes", default=",".join(TRACE_MODES),
                    help="reasoning modes each traced question gets an SFT row for (interleave always)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args(argv)
    card = generate(a.out, a.num_scenes, a.views_per_scene, a.seed, a.split, a.width, a.height,
                    a.questions_per_view, a.traces_per_view, a.workers,
                    trace_modes=tuple(m for m in a.trace_modes.split(",") if m))
    print(json.dumps({k: card[k] for k in ("scenes", "views", "questions_per_category")}, indent=1))


if __name__ == "__main__":
    main()
