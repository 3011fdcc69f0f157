"""Evaluate a checkpoint: depth, segmentation, spatial QA per mode, quality against denoising steps.

    python -m training.evaluate --checkpoint DIR --data runs/data/test --out runs/eval
        [--nyuv2 nyu_depth_v2_labeled.mat] [--ade20k ADEChallengeData2016] [--max-images 64]

Depth follows upstream's protocol (Marigold's): least-squares scale and shift of the prediction to
the ground truth over valid pixels, clamp to the dataset range, then AbsRel, delta1 (max ratio
< 1.25), RMSE. The same metrics *without* alignment are reported for metric checkpoints, since the
synthetic depth is metric. Segmentation: mIoU of decoded labels over the classes present in the
ground truth or the prediction, from one confusion matrix over the split. QA: the data engine's
rule judge (`training.data.questions.score`) per category in each mode (`direct`, `perception`,
`text`, `interleave`). `--qa-given-maps` adds `perception` and `interleave` with the ground-truth
maps shown in place of generated ones (`+gt`): what the reasoning makes of perfect maps, which
separates the maps' share of an error from the reasoning's. Writes `report.json`, `report.md`,
`qa_answers.jsonl` (every answer with its turns), plots and example images to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cooper_model import image_processor as ip
from cooper_model.alignment import depth_metrics
from cooper_model.codecs import DepthCodec, colorize_depth
from cooper_model.inference import decode_depth01
from cooper_model.pipeline import TASK_DEFAULTS, CooperPipeline
from training.stage1_data import depth_target, segmentation_target

NYU_CROP = (slice(45, 471), slice(41, 601))  # upstream's NYUv2 evaluation crop
MODES = ("direct", "perception", "text", "interleave")
GIVEN_MAPS_SUFFIX = "+gt"  # a mode run with the ground-truth maps shown instead of generated ones


# Metrics ------------------------------------------------------------------------------------------

def mean_metrics(rows: list[dict]) -> dict:
    rows = [r for r in rows if r]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def miou(confusion: np.ndarray) -> tuple[float, dict]:
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    per_class = {int(i): float(inter[i] / union[i]) for i in np.flatnonzero(present)}
    return float(np.mean(inter[present] / union[present])), per_class




def _finite_depth(depth: np.ndarray, depth_range) -> np.ndarray:
    # REP 118 marks saturated pixels -inf/+inf; for metrics they are the range's ends
    return np.nan_to_num(depth, neginf=depth_range[0], posinf=depth_range[1])


# Evaluations --------------------------------------------------------------------------------------

def evaluate_maps(pipe: CooperPipeline, samples, settings: dict, depth_range, crop=None, max_images=None,
                  examples: list | None = None, desc="maps", segment: bool = True) -> dict:
    aligned, metric, times = [], [], {"depth": [], "segment": []}
    num_classes = len(pipe.class_names) if pipe.has_palette else 0
    confusion = np.zeros((num_classes, num_classes), np.int64) if num_classes else None
    for n, s in enumerate(tqdm(samples, desc=desc, total=max_images, leave=False)):
        if max_images is not None and n >= max_images:
            break
        pred_depth = pred_labels = None
        if s.depth is not None:
            start = time.perf_counter()
            out = pipe.depth(s.rgb, **settings)
            times["depth"].append(time.perf_counter() - start)
            gt = s.depth if crop is None else s.depth[crop]
            rel = out.relative if crop is None else out.relative[crop]
            aligned.append(depth_metrics(rel, gt, depth_range, align=True))
            m = out.depth  # None for a relative checkpoint
            if m is not None:
                m = _finite_depth(m if crop is None else m[crop], depth_range)
                metric.append(depth_metrics(m, gt, depth_range, align=False))
            pred_depth = out.relative
        if segment and s.class_map is not None and confusion is not None:
            start = time.perf_counter()
            seg = pipe.segment(s.rgb, **settings)
            times["segment"].append(time.perf_counter() - start)
            if seg.labels is not None:
                gt = s.class_map.astype(np.int64)
                ok = (gt >= 0) & (gt < num_classes)
                confusion += np.bincount(gt[ok] * num_classes + seg.labels.astype(np.int64)[ok],
                                         minlength=num_classes**2).reshape(num_classes, num_classes)
                pred_labels = seg.raw
        if examples is not None and len(examples) < 4:
            examples.append((s, pred_depth, pred_labels))
    result = {"depth_aligned": mean_metrics(aligned), "depth_metric": mean_metrics(metric),
              "images": len(aligned), "seconds_per_depth_map": float(np.mean(times["depth"])) if times["depth"] else None,
              "seconds_per_segmentation": float(np.mean(times["segment"])) if times["segment"] else None}
    if confusion is not None and confusion.sum():
        result["segmentation_miou"], per_class = miou(confusion)
        result["segmentation_iou_per_class"] = {pipe.class_names[k]: v for k, v in per_class.items()}
        result["segmentation_pixel_accuracy"] = float(np.trace(confusion) / confusion.sum())
    return result


def autoencoder_ceiling(pipe: CooperPipeline, samples, depth_range, max_images=None) -> dict:
    """The maps a perfect denoiser would give: each ground-truth map encoded at the model's
    resolution, decoded and resized back as the pipeline does, then scored like a prediction.
    No generated map beats it: it is the bound the autoencoder and the map resolution set."""
    import torch

    vae, codec = pipe.inferencer.vae, DepthCodec(*depth_range)
    palette = np.asarray(pipe.config.palette, np.uint8) if pipe.has_palette else None
    num_classes = len(palette) if palette is not None else 0
    confusion = np.zeros((num_classes, num_classes), np.int64)
    aligned = []

    def round_trip(image: torch.Tensor) -> torch.Tensor:  # [3, H, W] in [-1, 1]
        with torch.inference_mode():
            return vae.decode(vae.encode(image[None], sample=False))[0].float()

    for n, s in enumerate(tqdm(samples, desc="autoencoder ceiling", total=max_images, leave=False)):
        if max_images is not None and n >= max_images:
            break
        h, w = s.rgb.shape[:2]
        size = ip.target_size(w, h, pipe.config.vae_transform)
        if s.depth is not None:
            target = depth_target(s.depth, size, codec)   # the training target, in float
            rel = torch.nn.functional.interpolate(decode_depth01(round_trip(target))[None, None], size=(h, w),
                                                  mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
            aligned.append(depth_metrics(rel, s.depth, depth_range, align=True))
        if s.class_map is not None and palette is not None:
            gt = s.class_map.astype(np.int64)
            ok = (gt >= 0) & (gt < num_classes)
            target = segmentation_target(np.where(ok, gt, 0), size, palette)
            raw = np.asarray(Image.fromarray(ip.to_uint8(round_trip(target))).resize((w, h), Image.NEAREST))
            labels = pipe.segmentation_codec.decode(raw).astype(np.int64)
            confusion += np.bincount(gt[ok] * num_classes + labels[ok],
                                     minlength=num_classes**2).reshape(num_classes, num_classes)
    result = {"depth_aligned": mean_metrics(aligned), "images": len(aligned)}
    if confusion.sum():
        result["segmentation_miou"], _ = miou(confusion)
        result["segmentation_pixel_accuracy"] = float(np.trace(confusion) / confusion.sum())
    return result


def evaluate_steps(pipe, samples, base: dict, depth_range, steps=(2, 3, 5, 9, 17)) -> list[dict]:
    """Depth quality and time against the number of denoising evaluations, with and without CFG."""
    rows = []
    for cfg in (False, True):
        for n in steps:
            settings = dict(base, num_steps=n)
            if not cfg:
                settings["cfg_text_scale"] = 1.0
            elif pipe.settings("depth", **settings).cfg_text_scale <= 1.0:
                # a checkpoint whose default is no CFG: "on" means COOPER's evaluation scales
                settings.update(cfg_text_scale=TASK_DEFAULTS["depth"]["cfg_text_scale"],
                                cfg_img_scale=TASK_DEFAULTS["depth"]["cfg_img_scale"])
            r = evaluate_maps(pipe, samples, settings, depth_range, desc=f"steps={n} cfg={cfg}", segment=False)
            rows.append({"num_steps": n, "model_evaluations": n - 1, "cfg": cfg,
                         **{f"aligned_{k}": v for k, v in r["depth_aligned"].items()},
                         "seconds_per_map": r["seconds_per_depth_map"]})
    return rows


def form_group(q: dict) -> str:
    from training.data.questions import is_choice

    return "choice" if is_choice(q) else "numeric"


def pick_questions(questions: list[dict], count: int, seed: int = 0) -> list[dict]:
    """`count` questions spread evenly over (category, form group), seeded: every category is
    measured, rather than the split's mix deciding which ones a small sample sees."""
    rng = np.random.default_rng(seed)
    groups = defaultdict(list)
    for q in questions:
        groups[(q["category"], form_group(q))].append(q)
    keys = sorted(groups)
    for k in keys:
        groups[k] = [groups[k][i] for i in rng.permutation(len(groups[k]))]
    picked, rank = [], 0
    while len(picked) < count and any(rank < len(groups[k]) for k in keys):
        picked += [groups[k][rank] for k in keys if rank < len(groups[k])][: count - len(picked)]
        rank += 1
    return picked


def blind_floor(data_dir: Path) -> dict:
    """Per category, from the split's card (`python -m training.data.baselines --card`): chance and
    the best blind baseline on multiple choice / yes-no, and the class prior on numeric answers."""
    card = data_dir / "card.json"
    blind = json.loads(card.read_text()).get("blind_baselines") if card.is_file() else None
    if not blind:
        return {}
    out = defaultdict(dict)
    for name, per_cat in blind.get("choice", {}).items():
        for cat, r in per_cat.items():
            out[cat]["chance"] = r["chance"]
            if r["accuracy"] > out[cat].get("best_blind_choice", -1):
                out[cat].update(best_blind_choice=r["accuracy"], best_blind_choice_name=name)
    for name, per_cat in blind.get("numeric", {}).items():
        for cat, r in per_cat.items():
            if r["accuracy"] > out[cat].get("best_blind_numeric", -1):
                out[cat].update(best_blind_numeric=r["accuracy"], best_blind_numeric_name=name)
    return dict(out)


def evaluate_qa(pipe, data_dir: Path, count: int, settings: dict, given_maps: bool = False) -> dict:
    from training.data.questions import load_questions, score
    from training.data.schema import Sample

    picked = pick_questions(load_questions(data_dir), count)
    out, answers = {}, []
    runs = list(MODES) + ([f"{m}{GIVEN_MAPS_SUFFIX}" for m in ("perception", "interleave")] if given_maps else [])
    for name in runs:
        mode = name.removesuffix(GIVEN_MAPS_SUFFIX)
        correct, tools = defaultdict(list), defaultdict(lambda: defaultdict(int))
        for q in tqdm(picked, desc=f"qa {name}", leave=False):
            maps = {}
            if name.endswith(GIVEN_MAPS_SUFFIX):
                truth = Sample.load((data_dir / q["image"]).parent)
                rgb, maps = truth.rgb, {"depth_m": truth.depth, "labels": truth.class_map}
            else:
                rgb = np.asarray(Image.open(data_dir / q["image"]).convert("RGB"))
            ans = pipe.ask(rgb, q["question"], mode=mode, **maps, **settings)
            ok = bool(score(q, ans.answer))
            correct[(q["category"], form_group(q))].append(ok)
            answers.append({"mode": name, "qid": q["qid"], "category": q["category"], "form": q["form"],
                            "truth": q["answer"], "correct": ok, "tools": ans.tools_used, "turns": ans.turns})
            for t in set(ans.tools_used):
                tools[q["category"]][t] += 1
        per_cat = defaultdict(list)
        for (cat, _), v in correct.items():
            per_cat[cat] += v
        out[name] = {"accuracy": float(np.mean([v for vals in per_cat.values() for v in vals])),
                     "per_category": {k: float(np.mean(v)) for k, v in sorted(per_cat.items())},
                     "per_category_form": {f"{c}/{f}": float(np.mean(v)) for (c, f), v in sorted(correct.items())},
                     "questions_per_category_form": {f"{c}/{f}": len(v) for (c, f), v in sorted(correct.items())},
                     "questions_per_category": {k: len(v) for k, v in sorted(per_cat.items())},
                     # share of the category's questions whose answer called each tool at least once
                     "tool_call_rate_per_category": {c: {t: n / len(per_cat[c]) for t, n in sorted(v.items())}
                                                     for c, v in sorted(tools.items())}}
    return {"modes": out, "blind": blind_floor(data_dir), "answers": answers}


# Report ---------------------------------------------------------------------------------------------

def save_examples(examples, path: Path, depth_range) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 5, figsize=(15, 2.6 * len(examples)), squeeze=False)
    lo, hi = depth_range
    for row, (s, depth, seg) in zip(axes, examples):
        gt01 = np.clip((np.nan_to_num(s.depth, nan=lo) - lo) / (hi - lo), 0, 1) if s.depth is not None else None
        panels = [(s.rgb, "RGB"), (colorize_depth(gt01) if gt01 is not None else None, "depth (truth)"),
                  (colorize_depth(depth) if depth is not None else None, "depth (model)"),
                  (None, "segmentation (truth)"), (seg, "segmentation (model)")]
        if s.class_map is not None and seg is not None:
            from cooper_model.codecs import default_palette

            panels[3] = (default_palette(max(int(s.class_map.max()) + 1, 2))[s.class_map], "segmentation (truth)")
        for ax, (img, title) in zip(row, panels):
            ax.axis("off")
            ax.set_title(title, fontsize=9)
            if img is not None:
                ax.imshow(img)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_steps(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for cfg in (False, True):
        sel = [r for r in rows if r["cfg"] == cfg and "aligned_absrel" in r]
        x = [r["model_evaluations"] for r in sel]
        a.plot(x, [r["aligned_absrel"] for r in sel], "o-", label=f"CFG {'on' if cfg else 'off'}")
        b.plot(x, [r["seconds_per_map"] for r in sel], "o-", label=f"CFG {'on' if cfg else 'off'}")
    a.set(xlabel="denoising steps (model evaluations)", ylabel="AbsRel (aligned)", xscale="log")
    b.set(xlabel="denoising steps (model evaluations)", ylabel="seconds per map", xscale="log")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = [f"# Evaluation of `{report['checkpoint']}`", "", f"Data: `{report['data']}`; settings: "
             f"`{json.dumps(report['settings'])}`", ""]
    for name, r in report["datasets"].items():
        lines += [f"## {name} ({r['images']} images)", "", "| metric | value |", "|---|---|"]
        for k, v in r["depth_aligned"].items():
            lines.append(f"| depth {k} (scale/shift aligned) | {v:.4f} |")
        for k, v in r["depth_metric"].items():
            lines.append(f"| depth {k} (metric, no alignment) | {v:.4f} |")
        if "segmentation_miou" in r:
            lines.append(f"| segmentation mIoU | {r['segmentation_miou']:.4f} |")
            lines.append(f"| segmentation pixel accuracy | {r['segmentation_pixel_accuracy']:.4f} |")
        if r.get("seconds_per_depth_map"):
            lines.append(f"| seconds per depth map | {r['seconds_per_depth_map']:.3f} |")
        lines.append("")
    if report.get("autoencoder_ceiling"):
        c = report["autoencoder_ceiling"]
        lines += ["## Autoencoder ceiling", "", "Ground-truth maps through the autoencoder at the model's resolution "
                  f"and back ({c['images']} images): what a perfect denoiser would score.", "",
                  "| metric | value |", "|---|---|"]
        for k, v in c["depth_aligned"].items():
            lines.append(f"| depth {k} (scale/shift aligned) | {v:.4f} |")
        if "segmentation_miou" in c:
            lines.append(f"| segmentation mIoU | {c['segmentation_miou']:.4f} |")
            lines.append(f"| segmentation pixel accuracy | {c['segmentation_pixel_accuracy']:.4f} |")
        lines.append("")
    if report.get("steps"):
        lines += ["## Depth quality against denoising steps", "", "| steps | CFG | AbsRel | delta1 | s/map |",
                  "|---|---|---|---|---|"]
        for r in report["steps"]:
            lines.append(f"| {r['model_evaluations']} | {'on' if r['cfg'] else 'off'} | {r.get('aligned_absrel', float('nan')):.4f} "
                         f"| {r.get('aligned_delta1', float('nan')):.4f} | {r['seconds_per_map']:.3f} |")
        lines += ["", "![steps](steps.png)", ""]
    if report.get("qa"):
        lines += qa_markdown(report["qa"])
    lines += ["## Examples", "", "![examples](examples.png)", ""]
    return "\n".join(lines)


def qa_markdown(qa: dict) -> list[str]:
    modes, blind = qa["modes"], qa.get("blind", {})
    keys = sorted({k for m in modes.values() for k in m["per_category_form"]})
    n = next(iter(modes.values()))["questions_per_category_form"]
    lines = ["## Spatial QA accuracy", "",
             "Per category and answer form (choice: multiple choice and yes/no; numeric: within the tolerance). "
             "Blind floor: the best baseline that sees only the question text and options, on the whole split "
             "(`training.data.baselines`); chance applies to choice questions.", "",
             "| category / form | n | " + " | ".join(modes) + " | chance | best blind |", "|---|---|" + "---|" * (len(modes) + 2)]
    for k in keys:
        cat, form = k.split("/")
        b = blind.get(cat, {})
        floor = b.get("best_blind_choice") if form == "choice" else b.get("best_blind_numeric")
        chance = b.get("chance") if form == "choice" else None
        fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {k} | {n.get(k, 0)} | " + " | ".join(fmt(m["per_category_form"].get(k)) for m in modes.values())
                     + f" | {fmt(chance)} | {fmt(floor)} |")
    lines.append("| **all** | " + str(sum(n.values())) + " | " + " | ".join(f"{m['accuracy']:.3f}" for m in modes.values()) + " | | |")
    with_tools = [m for m in modes if m.removesuffix(GIVEN_MAPS_SUFFIX) in ("interleave", "perception")]
    lines += ["", f"Tool calls: share of each category's questions whose answer called for the map ({GIVEN_MAPS_SUFFIX}: "
              "the ground-truth map was shown instead of a generated one).", "",
              "| category | " + " | ".join(f"{m} depth | {m} seg" for m in with_tools) + " |",
              "|---|" + "---|---|" * len(with_tools)]
    for cat in sorted({k.split("/")[0] for k in keys}):
        cells = []
        for name, m in modes.items():
            if name in with_tools:
                rate = m["tool_call_rate_per_category"].get(cat, {})
                cells += [f"{rate.get('depth', 0.0):.2f}", f"{rate.get('segmentation', 0.0):.2f}"]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None):
    from training.data.readers import read_ade20k, read_nyuv2, read_synth

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="a synthetic split (python -m training.data.synth)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--num-steps", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--cfg-text-scale", type=float, default=None)
    parser.add_argument("--steps-sweep", default="2,3,5,9,17", help="num_steps values ('' to skip)")
    parser.add_argument("--steps-images", type=int, default=16)
    parser.add_argument("--qa-questions", type=int, default=40,
                        help="questions per mode, spread evenly over category and answer form (0 to skip)")
    parser.add_argument("--qa-given-maps", action="store_true",
                        help=f"also run perception and interleave with the ground-truth maps ({GIVEN_MAPS_SUFFIX} columns)")
    parser.add_argument("--nyuv2", default=None, help="nyu_depth_v2_labeled.mat")
    parser.add_argument("--ade20k", default=None, help="ADEChallengeData2016 directory (validation split)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = CooperPipeline.from_pretrained(args.checkpoint)
    settings = {k: v for k, v in dict(num_steps=args.num_steps, cfg_text_scale=args.cfg_text_scale).items() if v is not None}
    depth_range = tuple(pipe.depth_range)
    examples: list = []
    report = {"checkpoint": str(args.checkpoint), "data": str(args.data), "settings": settings, "datasets": {}}
    data = Path(args.data)
    report["datasets"]["synthetic test"] = evaluate_maps(pipe, read_synth(data), settings, depth_range,
                                                         max_images=args.max_images, examples=examples)
    if args.nyuv2:
        report["datasets"]["NYUv2"] = evaluate_maps(pipe, read_nyuv2(args.nyuv2, args.max_images), settings,
                                                    (1e-3, 10.0), crop=NYU_CROP, desc="nyuv2")
    if args.ade20k:
        report["datasets"]["ADE20K"] = evaluate_maps(pipe, read_ade20k(args.ade20k, "validation", args.max_images),
                                                     settings, depth_range, desc="ade20k")
    report["autoencoder_ceiling"] = autoencoder_ceiling(pipe, read_synth(data), depth_range, args.max_images)
    if args.steps_sweep:
        steps = [int(s) for s in args.steps_sweep.split(",")]
        samples = list(read_synth(data))[: args.steps_images]
        report["steps"] = evaluate_steps(pipe, samples, settings, depth_range, steps)
        plot_steps(report["steps"], out / "steps.png")
    if args.qa_questions:
        report["qa"] = evaluate_qa(pipe, data, args.qa_questions, settings, given_maps=args.qa_given_maps)
    if examples:
        save_examples(examples, out / "examples.png", depth_range)
    if "qa" in report:  # every answer, one a line, for reading what went wrong
        with open(out / "qa_answers.jsonl", "w") as f:
            f.writelines(json.dumps(a) + "\n" for a in report["qa"].pop("answers"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
