"""The one sample type every source yields (generator, dataset readers, COOPER jsonl readers).

On disk a sample is a directory:
    rgb.png              uint8 RGB
    depth.png            uint16 planar depth in millimetres, 0 = invalid (optional)
    class.png            uint8 class ids in `class_names` (optional)
    instance.png         uint16 instance ids, 0 = not an object (optional)
    seg_image.png        colour segmentation as a dataset ships it (optional)
    meta.json            everything else (intrinsics, pose, objects, questions, ...)
Depth in memory is float32 metres with NaN where invalid.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .geometry import Intrinsics

DEPTH_PNG_SCALE = 1000.0  # depth.png stores millimetres (COOPER's Hypersim/NYU scale factor)


@dataclass
class ObjectAnnotation:
    instance_id: int  # value of this object in the instance map
    class_name: str
    class_id: int
    colour: str | None  # named colour, None for textured objects
    centre: list[float]  # 3-D box centre, camera frame, metres
    size: list[float]  # full extents along the box axes (x, y, z of the object), metres
    rotation: list[list[float]]  # box axes in the camera frame (3x3, columns)
    height: float  # vertical (world z) extent, metres
    bbox2d: list[int] | None  # visible-pixel box [x0, y0, x1, y1], inclusive; None if unseen
    pixels: int  # visible pixel count

    @property
    def label(self) -> str:
        return f"{self.colour} {self.class_name}" if self.colour else self.class_name


@dataclass
class Sample:
    sample_id: str
    source: str  # "synth", "hypersim", "vkitti2", "nyuv2", "ade20k", "cooper-sft", ...
    rgb: np.ndarray  # uint8 [H,W,3]
    depth: np.ndarray | None = None  # float32 [H,W] metres, NaN invalid
    class_map: np.ndarray | None = None  # int32 [H,W] index into class_names
    instance_map: np.ndarray | None = None  # int32 [H,W], 0 = no object
    seg_image: np.ndarray | None = None  # uint8 [H,W,3] colour segmentation as a dataset ships it
    class_names: list[str] | None = None
    intrinsics: Intrinsics | None = None
    cam_to_world: np.ndarray | None = None  # 4x4, OpenCV camera, z-up world
    depth_range: tuple[float, float] | None = None  # metric range used for Stage-1 targets
    objects: list[ObjectAnnotation] = field(default_factory=list)
    questions: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def object(self, instance_id: int) -> ObjectAnnotation:
        return next(o for o in self.objects if o.instance_id == instance_id)

    # ---- disk format -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.rgb).save(d / "rgb.png")
        if self.depth is not None:
            mm = np.nan_to_num(self.depth * DEPTH_PNG_SCALE, nan=0.0)
            Image.fromarray(np.clip(np.round(mm), 0, 65535).astype(np.uint16)).save(d / "depth.png")
        if self.class_map is not None:
            Image.fromarray(self.class_map.astype(np.uint8)).save(d / "class.png")
        if self.instance_map is not None:
            Image.fromarray(self.instance_map.astype(np.uint16)).save(d / "instance.png")
        if self.seg_image is not None:
            Image.fromarray(self.seg_image).save(d / "seg_image.png")
        meta = {
            "sample_id": self.sample_id,
            "source": self.source,
            "class_names": self.class_names,
            "intrinsics": self.intrinsics.to_dict() if self.intrinsics else None,
            "cam_to_world": None if self.cam_to_world is None else np.asarray(self.cam_to_world).tolist(),
            "depth_range": list(self.depth_range) if self.depth_range else None,
            "depth_png_scale": DEPTH_PNG_SCALE,
            "objects": [asdict(o) for o in self.objects],
            "questions": self.questions,
            "meta": self.meta,
        }
        (d / "meta.json").write_text(json.dumps(meta, indent=1))

    @staticmethod
    def load(directory: str | os.PathLike) -> "Sample":
        d = Path(directory)
        meta = json.loads((d / "meta.json").read_text())
        depth = class_map = instance_map = seg_image = None
        if (d / "depth.png").exists():
            raw = np.asarray(Image.open(d / "depth.png")).astype(np.float32)
            depth = np.where(raw > 0, raw / meta.get("depth_png_scale", DEPTH_PNG_SCALE), np.nan)
            depth = depth.astype(np.float32)
        if (d / "class.png").exists():
            class_map = np.asarray(Image.open(d / "class.png")).astype(np.int32)
        if (d / "instance.png").exists():
            instance_map = np.asarray(Image.open(d / "instance.png")).astype(np.int32)
        if (d / "seg_image.png").exists():
            seg_image = np.asarray(Image.open(d / "seg_image.png").convert("RGB"))
        intr = meta.get("intrinsics")
        pose = meta.get("cam_to_world")
        return Sample(
            sample_id=meta["sample_id"],
            source=meta["source"],
            rgb=np.asarray(Image.open(d / "rgb.png").convert("RGB")),
            depth=depth,
            class_map=class_map,
            instance_map=instance_map,
            seg_image=seg_image,
            class_names=meta.get("class_names"),
            intrinsics=Intrinsics.from_dict(intr) if intr else None,
            cam_to_world=None if pose is None else np.array(pose),
            depth_range=tuple(meta["depth_range"]) if meta.get("depth_range") else None,
            objects=[ObjectAnnotation(**o) for o in meta.get("objects", [])],
            questions=meta.get("questions", []),
            meta=meta.get("meta", {}),
        )
