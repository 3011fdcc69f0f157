"""Readers for the real datasets COOPER trained on, in their native on-disk layouts, and for
COOPER's released jsonl files. Every reader yields `Sample`s, like the generator. Nothing is
downloaded: each reader reads what is on disk and raises `MissingDataError` naming what it
expected and where to get it.

    Hypersim    ROOT/ai_001_001/images/scene_cam_00_geometry_hdf5/frame.0000.depth_meters.hdf5
                (distance to the camera centre, converted to planar depth), ...semantic.hdf5
                (NYU40 ids), ...semantic_instance.hdf5, and the RGB in
                scene_cam_00_final_preview/frame.0000.tonemap.jpg (or ..._final_hdf5/frame.0000.color.hdf5)
    vKITTI 2    ROOT/Scene01/clone/frames/{rgb,depth,classSegmentation}/Camera_0/{rgb_00000.jpg,
                depth_00000.png (uint16 cm), classgt_00000.png}, Scene01/clone/{intrinsic,extrinsic,colors}.txt
    NYUv2       nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5: images, depths, labels, instances, names)
    ADE20K      ROOT/images/{training,validation}/*.jpg, ROOT/annotations/{training,validation}/*.png,
                optional ROOT/objectInfo150.csv (SceneParsing / ADEChallengeData2016 release)
    COOPER      Stage-1 jsonl (rgb_image + depth_image | seg_image), Interleaved_SFT.jsonl, RL_data.jsonl
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .geometry import Intrinsics, distance_to_planar
from .schema import Sample


class MissingDataError(FileNotFoundError):
    """The dataset (or a part of it) is not on disk where the reader looked."""


NYU40_CLASSES = (
    "unlabeled", "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow",
    "mirror", "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper",
    "towel", "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink",
    "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)
# Metric ranges COOPER (after Marigold) clamps each dataset's depth to.
DEPTH_RANGES = {"hypersim": (1e-5, 65.0), "vkitti2": (1e-5, 80.0), "nyuv2": (1e-3, 10.0),
                "kitti": (1e-5, 80.0)}
# Raw depth PNG units per metre in COOPER's Stage-1 jsonl datasets.
DEPTH_PNG_SCALES = {"vkitti": 100.0, "kitti": 256.0, "hypersim": 1000.0, "nyu": 1000.0}
# Hypersim renders 1024x768 with a 60 degree horizontal field of view.
HYPERSIM_INTRINSICS = Intrinsics(886.81, 886.81, 512.0, 384.0, 1024, 768)
# NYUv2 RGB camera (toolbox camera_params.m), 640x480.
NYU_INTRINSICS = Intrinsics(518.8579, 519.4696, 325.5824, 253.7362, 640, 480)


def _require(path: Path, what: str, hint: str) -> Path:
    if not path.exists():
        raise MissingDataError(f"{what} not found: {path}. {hint}")
    return path


def _h5(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return f["dataset"][()]


# ---- Hypersim ---------------------------------------------------------------------------------

HYPERSIM_HINT = ("Expected Hypersim's layout ROOT/<scene>/images/scene_cam_XX_geometry_hdf5/"
                 "frame.IIII.depth_meters.hdf5; get it with the ml-hypersim download script.")


def _tonemap(hdr: np.ndarray) -> np.ndarray:
    """Hypersim's own tonemapping idea: scale so the 90th percentile brightness maps to 0.8, gamma 2.2."""
    lum = hdr.mean(-1)
    scale = 0.8 / max(np.percentile(lum[np.isfinite(lum)], 90), 1e-6)
    return (np.clip(np.nan_to_num(hdr * scale), 0, 1) ** (1 / 2.2) * 255).astype(np.uint8)


def read_hypersim(root: str | Path, max_samples: int | None = None) -> Iterator[Sample]:
    root = Path(root)
    frames = sorted(root.glob("*/images/scene_cam_*_geometry_hdf5/frame.*.depth_meters.hdf5"))
    if not frames:
        raise MissingDataError(f"Hypersim: no depth frames under {root}. {HYPERSIM_HINT}")
    for path in frames[:max_samples]:
        geo = path.parent
        frame = path.name.split(".")[1]
        cam = geo.name[: -len("_geometry_hdf5")]
        preview = geo.parent / f"{cam}_final_preview" / f"frame.{frame}.tonemap.jpg"
        colour = geo.parent / f"{cam}_final_hdf5" / f"frame.{frame}.color.hdf5"
        if preview.exists():
            rgb = np.asarray(Image.open(preview).convert("RGB"))
        else:
            rgb = _tonemap(_h5(_require(colour, "Hypersim RGB (tonemap.jpg or color.hdf5)", HYPERSIM_HINT)))
        distance = _h5(path).astype(np.float32)
        h, w = distance.shape
        # Scale the nominal intrinsics if the frames were rendered at another resolution.
        s = w / HYPERSIM_INTRINSICS.width
        intr = Intrinsics(HYPERSIM_INTRINSICS.fx * s, HYPERSIM_INTRINSICS.fy * s, w / 2, h / 2, w, h)
        depth = distance_to_planar(distance, intr)
        depth[~np.isfinite(depth)] = np.nan
        sem_path = geo / f"frame.{frame}.semantic.hdf5"
        inst_path = geo / f"frame.{frame}.semantic_instance.hdf5"
        class_map = instance_map = None
        if sem_path.exists():
            class_map = np.maximum(_h5(sem_path).astype(np.int32), 0)  # -1 (unlabelled) -> 0
        if inst_path.exists():
            instance_map = _h5(inst_path).astype(np.int32) + 1  # -1 (none) -> 0
        yield Sample(sample_id=f"hypersim_{geo.parent.parent.name}_{cam}_{frame}", source="hypersim",
                     rgb=rgb, depth=depth, class_map=class_map, instance_map=instance_map,
                     class_names=list(NYU40_CLASSES), intrinsics=intr,
                     depth_range=DEPTH_RANGES["hypersim"])


# ---- Virtual KITTI 2 --------------------------------------------------------------------------

VKITTI_HINT = ("Expected Virtual KITTI 2's layout ROOT/SceneXX/<variation>/frames/{rgb,depth,"
               "classSegmentation}/Camera_N/ from the vkitti_2.0.3_{rgb,depth,classSegmentation} tars.")


def _vkitti_table(path: Path) -> dict[tuple[int, int], list[float]]:
    """intrinsic.txt / extrinsic.txt: a header line, then 'frame cameraID values...'."""
    rows = {}
    for line in path.read_text().splitlines()[1:]:
        if line.strip():
            vals = line.split()
            rows[(int(vals[0]), int(vals[1]))] = [float(v) for v in vals[2:]]
    return rows


def read_vkitti2(root: str | Path, max_samples: int | None = None) -> Iterator[Sample]:
    root = Path(root)
    depths = sorted(root.glob("Scene*/*/frames/depth/Camera_*/depth_*.png"))
    if not depths:
        raise MissingDataError(f"Virtual KITTI 2: no depth PNGs under {root}. {VKITTI_HINT}")
    for path in depths[:max_samples]:
        variation = path.parents[3]
        cam = int(path.parent.name.split("_")[1])
        idx = path.stem.split("_")[1]
        rgb_path = _require(variation / "frames" / "rgb" / path.parent.name / f"rgb_{idx}.jpg", "vKITTI RGB", VKITTI_HINT)
        raw = np.asarray(Image.open(path)).astype(np.float32)
        depth = raw / DEPTH_PNG_SCALES["vkitti"]
        depth[raw >= 65535] = np.nan  # sky is saturated at 655.35 m: no metric depth
        k = _vkitti_table(_require(variation / "intrinsic.txt", "vKITTI intrinsic.txt", VKITTI_HINT))[(int(idx), cam)]
        h, w = depth.shape
        intr = Intrinsics(k[0], k[1], k[2], k[3], w, h)
        meta = {"variation": variation.name, "scene": variation.parent.name, "camera": cam}
        if (variation / "extrinsic.txt").exists():  # world-to-camera, vKITTI's own (y-down) world
            meta["world_to_camera"] = np.array(_vkitti_table(variation / "extrinsic.txt")[(int(idx), cam)]).reshape(4, 4).tolist()
        class_map, class_names = None, None
        seg_path = variation / "frames" / "classSegmentation" / path.parent.name / f"classgt_{idx}.png"
        if seg_path.exists():
            colours = _require(variation / "colors.txt", "vKITTI colors.txt", VKITTI_HINT).read_text().splitlines()[1:]
            table = [(line.split()[0], tuple(int(v) for v in line.split()[1:4])) for line in colours if line.strip()]
            class_names = ["unlabeled"] + [name for name, _ in table]
            seg = np.asarray(Image.open(seg_path).convert("RGB")).astype(np.int32)
            code = (seg[..., 0] << 16) | (seg[..., 1] << 8) | seg[..., 2]
            class_map = np.zeros(code.shape, np.int32)
            for i, (_, (r, g, b)) in enumerate(table, start=1):
                class_map[code == ((r << 16) | (g << 8) | b)] = i
        yield Sample(sample_id=f"vkitti2_{variation.parent.name}_{variation.name}_{cam}_{idx}", source="vkitti2",
                     rgb=np.asarray(Image.open(rgb_path).convert("RGB")), depth=depth, class_map=class_map,
                     class_names=class_names, intrinsics=intr, depth_range=DEPTH_RANGES["vkitti2"], meta=meta)


# ---- NYUv2 ------------------------------------------------------------------------------------

def read_nyuv2(mat_path: str | Path, max_samples: int | None = None) -> Iterator[Sample]:
    """The labelled set; MATLAB stores arrays transposed, so each HxW map is read as [W,H] and .T'd."""
    import h5py

    mat_path = Path(mat_path)
    _require(mat_path, "NYUv2 labelled file", "Expected nyu_depth_v2_labeled.mat (MATLAB v7.3) from the "
             "NYU Depth V2 page.")
    with h5py.File(mat_path, "r") as f:
        for key in ("images", "depths"):
            if key not in f:
                raise MissingDataError(f"NYUv2: dataset '{key}' missing in {mat_path}")
        names = ["unlabeled"]
        if "names" in f:
            names += ["".join(chr(c) for c in f[ref][()].ravel()) for ref in f["names"][()].ravel()]
        n = f["images"].shape[0]
        for i in range(n if max_samples is None else min(n, max_samples)):
            depth = f["depths"][i].T.astype(np.float32)
            depth[depth <= 0] = np.nan
            yield Sample(
                sample_id=f"nyuv2_{i:04d}", source="nyuv2",
                rgb=np.ascontiguousarray(f["images"][i].transpose(2, 1, 0)), depth=depth,
                class_map=f["labels"][i].T.astype(np.int32) if "labels" in f else None,
                instance_map=f["instances"][i].T.astype(np.int32) if "instances" in f else None,
                class_names=names if "labels" in f else None, intrinsics=NYU_INTRINSICS,
                depth_range=DEPTH_RANGES["nyuv2"])


# ---- ADE20K -----------------------------------------------------------------------------------

def read_ade20k(root: str | Path, split: str = "training", max_samples: int | None = None) -> Iterator[Sample]:
    root = Path(root)
    images = sorted((root / "images" / split).glob("*.jpg"))
    if not images:
        raise MissingDataError(f"ADE20K: no images in {root / 'images' / split}. Expected the "
                               "ADEChallengeData2016 layout images/<split>/*.jpg + annotations/<split>/*.png.")
    names = None
    info = root / "objectInfo150.csv"
    if info.exists():
        with open(info, newline="") as f:
            names = ["other"] + [row["Name"].split(";")[0] for row in csv.DictReader(f)]
    for path in images[:max_samples]:
        ann = _require(root / "annotations" / split / f"{path.stem}.png", "ADE20K annotation",
                       "Every image needs annotations/<split>/<same name>.png.")
        yield Sample(sample_id=f"ade20k_{path.stem}", source="ade20k",
                     rgb=np.asarray(Image.open(path).convert("RGB")),
                     class_map=np.asarray(Image.open(ann)).astype(np.int32), class_names=names)


# ---- COOPER's jsonl files ---------------------------------------------------------------------

def _jsonl(path: Path) -> Iterator[dict]:
    _require(path, "COOPER jsonl", "Point at the file from the COOPER_Train_Set release.")
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def decode_b64_image(value: str) -> np.ndarray:
    if "base64," in value:  # data-URL prefix, as COOPER's loader tolerates
        value = value.split("base64,")[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(value))).convert("RGB"))


def read_cooper_stage1(jsonl: str | Path, data_dir: str | Path, dataset: str,
                       max_samples: int | None = None) -> Iterator[Sample]:
    """Stage-1 rows: `rgb_image` with `depth_image` (raw PNG, per-dataset scale) or `seg_image`."""
    data_dir = Path(data_dir)
    for i, row in enumerate(_jsonl(Path(jsonl))):
        if max_samples is not None and i >= max_samples:
            break
        rgb = np.asarray(Image.open(_require(data_dir / row["rgb_image"], "RGB image", "Check data_dir.")).convert("RGB"))
        depth = seg = None
        if "depth_image" in row:
            raw = np.asarray(Image.open(_require(data_dir / row["depth_image"], "depth image", "Check data_dir.")))
            scale = row.get("depth_scale", DEPTH_PNG_SCALES.get(dataset))
            if scale is None:
                raise ValueError(f"unknown depth scale for dataset {dataset!r}; pass one of {sorted(DEPTH_PNG_SCALES)}")
            depth = np.where(raw > 0, raw.astype(np.float32) / scale, np.nan).astype(np.float32)
        if "seg_image" in row:
            seg = np.asarray(Image.open(_require(data_dir / row["seg_image"], "segmentation image", "Check data_dir.")).convert("RGB"))
        rng_key = {"vkitti": "vkitti2", "nyu": "nyuv2"}.get(dataset, dataset)
        yield Sample(sample_id=row.get("data_id", f"{dataset}_{i:06d}"), source=f"cooper-stage1-{dataset}",
                     rgb=rgb, depth=depth, seg_image=seg,
                     depth_range=tuple(row["depth_range"]) if "depth_range" in row else DEPTH_RANGES.get(rng_key),
                     meta={"row": {k: v for k, v in row.items() if isinstance(v, (str, int, float))}})


def read_cooper_sft(jsonl: str | Path, max_samples: int | None = None) -> Iterator[Sample]:
    """Interleaved_SFT.jsonl: the first image is the sample's RGB; the whole trace is kept."""
    for i, row in enumerate(_jsonl(Path(jsonl))):
        if max_samples is not None and i >= max_samples:
            break
        items = row["interleaved_reason"]
        image = next((it for it in items if it["type"] == "image"), None)
        if image is None:
            raise ValueError(f"SFT row {i} has no image item")
        question = next((it["value"] for it in items if it["type"] == "text"), "")
        answer = re.findall(r"\\boxed\{([^{}]*)\}", items[-1]["value"]) if items[-1]["type"] == "text" else []
        yield Sample(sample_id=str(row.get("data_id", f"sft_{i:06d}")), source="cooper-sft",
                     rgb=decode_b64_image(image["value"]),
                     questions=[{"question": question, "answer": answer[-1] if answer else None,
                                 "interleaved_reason": items}])


def read_cooper_rl(jsonl: str | Path, image_root: str | Path, max_samples: int | None = None) -> Iterator[Sample]:
    """RL_data.jsonl: question, answer, image (relative to image_root), data_id, flag."""
    image_root = Path(image_root)
    for i, row in enumerate(_jsonl(Path(jsonl))):
        if max_samples is not None and i >= max_samples:
            break
        path = _require(image_root / row["image"], "RL image", "Check image_root.")
        yield Sample(sample_id=str(row["data_id"]), source="cooper-rl",
                     rgb=np.asarray(Image.open(path).convert("RGB")),
                     questions=[{"question": row["question"], "answer": row["answer"],
                                 "flag": row.get("flag", "boundary"), "data_id": row["data_id"]}])


def read_synth(split_dir: str | Path) -> Iterator[Sample]:
    """A split written by `python -m training.data.synth`, in manifest order."""
    split_dir = Path(split_dir)
    manifest = _require(split_dir / "manifest.json", "synth manifest", "Run python -m training.data.synth first.")
    for frame in json.loads(manifest.read_text())["frames"]:
        yield Sample.load(split_dir / Path(frame["rgb"]).parent)
