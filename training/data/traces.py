"""COOPER's training formats built from ground truth.

- Stage-2 SFT (`Interleaved_SFT.jsonl`): {"interleaved_reason": [{"type": "text"|"image",
  "value": str | base64 image, "need_loss": "true"|"false"}, ...]}. A trace that needs depth calls
  `<depth-estimation>` and gets the ground-truth depth (Spectral-coloured, as COOPER feeds a
  generated map back); counting/existence call `<segmentation>` and get the ground-truth class
  map in the checkpoint palette; both are followed by the reflection prompt. Questions no tool
  helps with get a direct `<think>...</think><answer>...\\boxed{}</answer>` trace.
  The same questions also get a row for each of the other modes the evaluation compares (`"mode"`:
  the `Reasoner`'s mode whose context the row is): `perception` (BAGEL-PE: the depth prompt and
  map, then the segmentation prompt and map, then `<answer>` and the answer, no reasoning) and
  `text` (BAGEL-RE: reasoning from the image alone, then the answer). BAGEL brings these abilities
  to COOPER's baselines; a small model trained from scratch has to be taught them, or those
  columns of the four-mode table would measure an untrained mode.
- RL (`RL_data.jsonl`): {question, answer, image, data_id, flag}; `image` is relative to the
  image root. flag: "negative" when no tool is needed, "boundary" when a tool helps but the image
  alone usually settles it (ordinal depth questions with a >2x depth gap, existence), else "positive".
- Stage 1: one row per view and modality. Depth: `depth_image` (uint16 PNG, `depth_scale` units
  per metre, 0 = invalid) and `depth_range`; the trainer computes the float target from them, as
  upstream does from 16-bit depth (an 8-bit target would be 3.9 cm a level at 10 m). Segmentation:
  `seg_image` (the colour target in the checkpoint palette) and `label_image` (class ids).
Traces quote what the maps can tell: see `map_distance` and `map_extent`.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image

from cooper_model.codecs import DepthCodec, SegmentationCodec, colorize_depth, default_palette
from cooper_model.prompts import DEPTH_PROMPT, REFLECTION_PROMPT, SEGMENTATION_PROMPT

TRACE_MODES = ("interleave", "perception", "text")

from .catalogue import CLASS_NAMES, PLURAL
from .geometry import project
from .questions import answer_text
from .schema import DEPTH_PNG_SCALE, Sample

SEG_CODEC = SegmentationCodec(default_palette(len(CLASS_NAMES)), list(CLASS_NAMES))


def image_b64(image: np.ndarray, fmt: str = "JPEG") -> str:
    """Base64 image as the SFT jsonl stores it (JPEG for photos/depth, PNG for flat label colours)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


def depth_feedback_image(sample: Sample) -> np.ndarray:
    return colorize_depth(DepthCodec(*sample.depth_range).normalize(sample.depth))


def segmentation_image(sample: Sample) -> np.ndarray:
    return SEG_CODEC.encode(sample.class_map)


# ---- reasoning text --------------------------------------------------------------------------

WHY_TOOL = {
    "depth": ["The question depends on metric distances, which are hard to judge from a single RGB "
              "image because apparent size mixes object size and distance. A depth map gives the "
              "distance of every pixel, so I will generate one.",
              "To answer this I need to know how far the objects are from the camera. Perspective "
              "alone is ambiguous, so I will estimate the depth of the image first.",
              "This is a question about 3-D geometry. I should look at the depth of the relevant "
              "objects rather than guess from the picture, so let me generate a depth map."],
    "segmentation": ["I need to find every instance of the object class, including small or partly "
                     "hidden ones. A segmentation map separates the objects, so I will generate one.",
                     "Locating the objects precisely will help here. Let me segment the image so each "
                     "object appears as its own coloured region.",
                     "Counting and finding objects is easier with a segmentation of the scene, so I "
                     "will segment the objects in the image first."],
}
DIRECT = ["This can be read directly from the image: the relation is visible in the layout, so no "
          "depth map or segmentation is needed.",
          "The positions of the two objects in the image settle this without any auxiliary map.",
          "I can answer from the image itself, since the question is about where the objects appear."]

# `text` mode on a question a map would help with: the estimate has to come from the picture.
FROM_IMAGE = ["Without a depth map or a segmentation I have to judge this from the image itself: "
              "apparent sizes, perspective and where the objects stand.",
              "I will estimate this from the picture alone, from the objects' apparent sizes and positions.",
              "No auxiliary map here, so I reason from the image: perspective, occlusion and familiar sizes."]


# The depth fed back is an 8-bit Spectral image over depth_range ([1e-3, 10] m here): one level
# is (10 - 1e-3) / 255 = 3.9 cm at best, and JPEG colour noise costs a level or two. So readings
# and distances derived from them are quoted to 0.1 m (to 0.05 m, about a level, below 1 m).
def map_distance(metres: float) -> str:
    if metres >= 1.0:
        return f"{round(metres, 1):.1f}"
    return f"{round(metres * 20) / 20:.2f}"


# Sizes come from a pixel extent times a depth reading: a few percent at best, so two
# significant figures (never finer than 1 cm).
def map_extent(metres: float) -> str:
    decimals = int(min(2, max(0, 1 - math.floor(math.log10(max(metres, 1e-3))))))
    return f"{round(metres, decimals):.{decimals}f}"


def _depth_of(sample: Sample, instance_id: int) -> float:
    return float(np.nanmedian(sample.depth[sample.instance_map == instance_id]))


def _analysis(sample: Sample, q: dict) -> tuple[str, str, str | None]:
    """(reasoning after the tool or in place of it, one-sentence summary, the estimate a numeric
    answer boxes) from the ground truth, at the precision the maps give."""
    obj = [sample.object(i) for i in q["objects"]]
    cat = q["category"]
    ans = q.get("answer_text", q["answer"])
    if cat in ("distance_camera", "size", "height"):
        o = obj[0]
        z = map_distance(_depth_of(sample, o.instance_id))
        if cat == "distance_camera":
            value = map_distance(np.linalg.norm(o.centre))
            return (f"In the depth map the {o.label} is at about {z} m along the viewing direction, "
                    f"and its centre is about {map_distance(np.hypot(o.centre[0], o.centre[1]))} m "
                    f"off the optical axis, so it is about {value} m from the camera.",
                    f"The {o.label} is about {value} m from the camera.", value)
        value = map_extent(max(o.size) if cat == "size" else o.height)
        x0, y0, x1, y1 = o.bbox2d
        px = y1 - y0 + 1 if cat == "height" else max(x1 - x0, y1 - y0) + 1
        what = "tall" if cat == "height" else "long along its longest side"
        return (f"The depth map places the {o.label} at about {z} m. At that distance its extent of "
                f"about {px} pixels in the image corresponds to roughly {value} m.",
                f"The {o.label} is about {value} m {what}.", value)
    if cat == "distance_objects":
        a, b = obj
        za, zb = (map_distance(_depth_of(sample, o.instance_id)) for o in obj)
        d = map_distance(np.linalg.norm(np.subtract(a.centre, b.centre)))
        return (f"From the depth map the {a.label} is about {za} m away and the {b.label} about "
                f"{zb} m. Combining these depths with where they appear in the image, the two "
                f"objects are about {d} m apart.",
                f"The {a.label} and the {b.label} are about {d} m apart.", d)
    if cat in ("closer", "front_behind"):
        a, b = obj
        if cat == "closer":  # the answer compares centre distances, so the text does too
            za, zb = np.linalg.norm(a.centre), np.linalg.norm(b.centre)
        else:  # depth extents do not overlap, so the visible surfaces are ordered the same way
            za, zb = _depth_of(sample, a.instance_id), _depth_of(sample, b.instance_id)
        nearer = a if za < zb else b
        ra, rb = map_distance(za), map_distance(zb)
        if ra == rb:  # closer than the map resolves in numbers; the colours still order them
            seen = f"The depth map shows the {a.label} and the {b.label} both at about {ra} m"
        else:
            seen = f"The depth map shows the {a.label} at about {ra} m and the {b.label} at about {rb} m"
        return f"{seen}, so the {nearer.label} is nearer to the camera.", f"The answer is {ans}.", None
    if cat == "counting":
        n = q["answer"] if q["form"] == "numeric" else int(ans)
        plural = PLURAL[q["class_name"]]
        return (f"The segmentation map shows {n} separate region{'s' if n != 1 else ''} of {plural}.",
                f"There {'is' if n == 1 else 'are'} {n} of them in the image.", None)
    if cat == "existence":
        found, name = q["answer"] == "yes", q["class_name"]
        return (f"The segmentation map {'contains' if found else 'has no'} region labelled {name}.",
                f"{'Yes' if found else 'No'}, there {'is' if found else 'is no'} {name} in the image.", None)
    a, b = obj  # left_right / above_below: read from the image
    if cat == "left_right":
        ua, ub = project(np.array([a.centre, b.centre]), sample.intrinsics)[:, 0]
        return (f"The {a.label} appears around x = {ua:.0f} px and the {b.label} around x = {ub:.0f} px, "
                f"so the {a.label} is to the {ans} of the {b.label}.", f"The answer is {ans}.", None)
    if ans == "above":
        how = f"its bottom is at or above the top of the {b.label}"
    else:
        how = f"its top is at or below the bottom of the {b.label}"
    return (f"The {a.label} sits {'higher' if ans == 'above' else 'lower'} in the scene than the "
            f"{b.label}: {how}.", f"The answer is {ans}.", None)


def sft_trace(sample: Sample, q: dict, rng: np.random.Generator, mode: str = "interleave") -> dict:
    """One Stage-2 SFT row in COOPER's interleaved schema, as the context of the `Reasoner`'s `mode`."""
    items = [{"type": "image", "value": image_b64(sample.rgb), "need_loss": "false"},
             {"type": "text", "value": q["question"], "need_loss": "false"}]
    reasoning, summary, estimate = _analysis(sample, q)
    # A numeric answer boxes the estimate the reasoning reached (within the tolerance of the truth).
    boxed = estimate if q["form"] == "numeric" and estimate is not None else answer_text(q)
    answer = f"{summary} \\boxed{{{boxed}}}</answer>"
    final = f"<answer>{answer}"
    tool = q["tool"]
    row = {"data_id": q["qid"], "category": q["category"], "tool": tool}
    if mode == "perception":  # the loop always generates both maps, then prompts "<answer>" itself
        items += [{"type": "text", "value": DEPTH_PROMPT, "need_loss": "false"},
                  {"type": "image", "value": image_b64(depth_feedback_image(sample)), "need_loss": "false"},
                  {"type": "text", "value": SEGMENTATION_PROMPT, "need_loss": "false"},
                  {"type": "image", "value": image_b64(segmentation_image(sample), "PNG"), "need_loss": "false"},
                  {"type": "text", "value": "<answer>", "need_loss": "false"},
                  {"type": "text", "value": answer, "need_loss": "true"}]
        return {**row, "data_id": f"{q['qid']}_perception", "mode": mode, "interleaved_reason": items}
    if mode == "text":
        if tool is None:  # the interleave trace's reasoning is read from the image already
            why = f"{DIRECT[rng.integers(len(DIRECT))]} {reasoning}"
        else:
            why = f"{FROM_IMAGE[rng.integers(len(FROM_IMAGE))]} {summary}"
        items.append({"type": "text", "value": f"<think>{why}</think>\n{final}", "need_loss": "true"})
        return {**row, "data_id": f"{q['qid']}_text", "mode": mode, "interleaved_reason": items}
    if mode != "interleave":
        raise ValueError(f"trace mode {mode!r} is not one of {TRACE_MODES}")
    if tool is None:
        items.append({"type": "text", "value": f"<think>{DIRECT[rng.integers(len(DIRECT))]} {reasoning}</think>\n{final}",
                      "need_loss": "true"})
    else:
        why = WHY_TOOL[tool][rng.integers(len(WHY_TOOL[tool]))]
        call, image, fmt = ((DEPTH_PROMPT, depth_feedback_image(sample), "JPEG") if tool == "depth"
                            else (SEGMENTATION_PROMPT, segmentation_image(sample), "PNG"))
        items += [{"type": "text", "value": f"<think>{why}</think>\n{call}", "need_loss": "true"},
                  {"type": "image", "value": image_b64(image, fmt), "need_loss": "false"},
                  {"type": "text", "value": REFLECTION_PROMPT, "need_loss": "false"},
                  {"type": "text", "value": f"<think>{reasoning}</think>\n{final}", "need_loss": "true"}]
    return {**row, "interleaved_reason": items}


def rl_flag(sample: Sample, q: dict) -> str:
    if q["tool"] is None:
        return "negative"
    if q["category"] == "existence":
        return "boundary"
    if q["category"] in ("closer", "front_behind"):
        za, zb = (_depth_of(sample, i) for i in q["objects"])
        if max(za, zb) > 2 * min(za, zb):
            return "boundary"
    return "positive"


def rl_row(sample: Sample, q: dict, image_path: str) -> dict:
    return {"question": q["question"], "answer": answer_text(q), "image": image_path,
            "data_id": q["qid"], "flag": rl_flag(sample, q), "category": q["category"]}


def stage1_files(sample: Sample) -> dict[str, np.ndarray]:
    """Extra per-view images for Stage 1: the segmentation colours (depth.png is the depth target)."""
    return {"seg.png": segmentation_image(sample)}


def stage1_rows(sample: Sample, view_dir: str) -> list[dict]:
    """Rows for COOPER's Stage-1 dataset (paths relative to the data_dir)."""
    base = {"rgb_image": f"{view_dir}/rgb.png", "data_id": sample.sample_id}
    return [dict(base, task="depth", prompt=DEPTH_PROMPT, depth_image=f"{view_dir}/depth.png",
                 depth_scale=DEPTH_PNG_SCALE, depth_range=list(sample.depth_range)),
            dict(base, task="segmentation", prompt=SEGMENTATION_PROMPT, seg_image=f"{view_dir}/seg.png",
                 label_image=f"{view_dir}/class.png")]
