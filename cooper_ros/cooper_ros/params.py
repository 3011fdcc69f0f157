"""Parameters of the cooper node: one table, used for declaration, validation and docs.

Every parameter has a type, a default, a description and a range or a set of choices. The node
declares them with ROS parameter descriptors (so `ros2 param describe` shows the range), and
checks every change (at start from the YAML and later at `set_parameters`) with
:func:`check_value` and :func:`check_consistency`; a refused value comes back with the reason.

Sentinels: for the generation overrides, ``0`` (ints) or ``-1.0`` (floats) means "the model's
default" and nothing is passed to the pipeline.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

__all__ = ["ParamSpec", "PARAMS", "SPEC_BY_NAME", "check_value", "check_consistency",
           "load_params_file", "MODES", "MODE_ALIASES", "RECONFIGURE_ONLY"]

# mode names accepted by the service -> the pipeline's mode
MODE_ALIASES = {
    "": None,             # -> query.default_mode
    "cooper": "interleave",
    "adaptive": "interleave",
    "interleave": "interleave",
    "text": "text",
    "perception": "perception",
    "direct": "direct",
}
MODES = ("cooper", "adaptive", "interleave", "text", "perception", "direct")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    min: float | int | None = None
    max: float | int | None = None
    choices: tuple | None = None
    pattern: str | None = None          # regex a string must match (fullmatch)
    check: Callable[[Any], str | None] | None = None  # further rule: the reason it fails, or None
    additional: str = ""                # extra constraint text for the descriptor

    @property
    def type(self) -> type:
        return type(self.default)


INT32_MAX = 2**31 - 1


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False

PARAMS: list[ParamSpec] = [
    # --- model (applied at configure; changing them needs cleanup + configure) ---
    ParamSpec("model.checkpoint", "",
              "Checkpoint directory (ema.safetensors, ae.safetensors, llm_config.json, "
              "vit_config.json, tokenizer). Empty = the small checkpoint bundled with cooper_model."),
    ParamSpec("model.device", "cpu",
              "Torch device: cpu, cuda, cuda:N or auto (cuda when available, else cpu).",
              pattern=r"cpu|auto|cuda(:\d+)?"),
    ParamSpec("model.dtype", "float32", "Compute dtype of the model.",
              choices=("float32", "bfloat16", "float16")),
    ParamSpec("model.backend", "eager",
              "Execution backend of the model, or a comma-separated fallback chain the pipeline "
              "resolves in order (e.g. tensorrt,onnxruntime,eager): the first that works on this "
              "machine is used and reported in /diagnostics.",
              pattern=r"[a-z_]+( *, *[a-z_]+)*"),
    ParamSpec("model.device_map", "",
              "Device map passed to CooperPipeline.from_pretrained: empty = none (everything on "
              "model.device), auto (accelerate spreads the model over the visible devices), or a "
              "JSON object {module name: device}.",
              check=lambda v: None if v in ("", "auto") or _is_json_object(v) else
              "must be empty, auto or a JSON object such as {\"language_model\": \"cuda:0\"}"),
    ParamSpec("model.cpu_threads", 0,
              "CPU threads of the model's math (torch intra-op) on a CPU device; 0 = torch's default "
              "(one per core). Fewer leave cores to the camera driver and other processes.",
              min=0, max=1024),
    # --- perception stream ---
    ParamSpec("perception.enabled", True, "Run depth/segmentation on incoming camera frames."),
    ParamSpec("perception.rate_hz", 0.0,
              "Maximum perception rate in Hz; 0 = as fast as the model allows. The node always "
              "works on the newest frame and drops the others.", min=0.0, max=1000.0),
    ParamSpec("perception.yield_to_questions", True,
              "A question that comes while a depth or segmentation map is being generated stops "
              "that map at the model's next stage (prefill, denoising step, decode) and goes "
              "first: it waits for one stage, not a whole perception step. The stopped depth "
              "frame is dropped (taken again if no newer one came), a stopped segmentation redone "
              "after the question; counted in perception_preempted. False: a step always finishes."),
    ParamSpec("outputs.depth", True,
              "Publish ~/depth/image (32FC1, metres) and ~/depth/camera_info, when the checkpoint's "
              "depth is metric or aligned to a metric source (alignment.source)."),
    ParamSpec("outputs.depth_relative", True,
              "Publish ~/depth/relative (32FC1, unitless in [0, 1], larger = farther): the model's "
              "depth before any metric scale."),
    ParamSpec("outputs.depth_colored", True, "Publish ~/depth/colored (rgb8 visualisation)."),
    ParamSpec("outputs.segmentation", True, "Publish ~/segmentation/image (rgb8 colour map)."),
    ParamSpec("outputs.labels", True,
              "Publish ~/segmentation/labels (16UC1 class ids), when the checkpoint declares a palette."),
    ParamSpec("outputs.points", True,
              "Publish ~/points (PointCloud2 from metric or aligned depth + the camera_info with the "
              "frame's stamp)."),
    ParamSpec("outputs.points_stride", 2, "Use every n-th pixel in each direction for ~/points.",
              min=1, max=64),
    ParamSpec("outputs.points_colored", True, "Colour ~/points with the camera image (x,y,z,rgb)."),
    ParamSpec("outputs.points_max_edge_jump", 0.05,
              "Drop a point whose depth differs from a neighbouring pixel's by more than this "
              "fraction of its depth (flying pixels along object edges); 0 = keep all.",
              min=0.0, max=10.0),
    # --- generation settings (sentinel = model default) ---
    ParamSpec("generation.num_steps", 0,
              "Flow-matching denoising steps for generated maps (>= 2); 0 = model default.",
              min=0, max=1000),
    ParamSpec("generation.cfg_text_scale", -1.0,
              "Text classifier-free guidance scale; -1 = model default.", min=-1.0, max=100.0),
    ParamSpec("generation.cfg_img_scale", -1.0,
              "Image classifier-free guidance scale; -1 = model default.", min=-1.0, max=100.0),
    ParamSpec("generation.cfg_interval_start", -1.0,
              "Start of the CFG interval (fraction of the schedule); -1 = model default.",
              min=-1.0, max=1.0),
    ParamSpec("generation.cfg_interval_end", -1.0,
              "End of the CFG interval (fraction of the schedule); -1 = model default.",
              min=-1.0, max=1.0),
    ParamSpec("generation.timestep_shift", -1.0, "Timestep shift of the sampler; -1 = model default.",
              min=-1.0, max=1000.0),
    ParamSpec("generation.seed", -1, "Random seed of the sampler; -1 = model default.",
              min=-1, max=INT32_MAX),
    ParamSpec("generation.vae_resolution", 0,
              "Resolution (pixels, longer side) the generated maps are made at; 0 = model default. "
              "Outputs are always resized back to the input resolution.", min=0, max=4096),
    ParamSpec("generation.vit_resolution", 0,
              "Resolution of the understanding (ViT) input; 0 = model default.", min=0, max=4096),
    # --- depth ---
    ParamSpec("depth.min_m", 0.0,
              "Metric depth below this (metres) is published as -inf (too close, REP 118); 0 = no "
              "limit beyond the model's own range.", min=0.0, max=10000.0),
    ParamSpec("depth.max_m", 0.0,
              "Metric depth above this (metres) is published as +inf (too far, REP 118); 0 = no "
              "limit beyond the model's own range.", min=0.0, max=10000.0),
    # --- metric alignment of relative depth ---
    ParamSpec("alignment.source", "none",
              "Sparse metric source the depth is fitted to per frame (robust scale and shift): "
              "none; depth = a depth image registered to the camera (topic alignment/depth, 32FC1 "
              "metres or 16UC1 millimetres); points = PointCloud2 (alignment/points); scan = "
              "LaserScan (alignment/scan). Points and scans are moved into the camera optical "
              "frame with alignment.source_to_camera (no TF) and projected with the camera_info.",
              choices=("none", "depth", "points", "scan")),
    ParamSpec("alignment.source_to_camera", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
              "Pose of the points/scan frame in the camera optical frame: x, y, z (metres), qx, qy, "
              "qz, qw, as static_transform_publisher takes it (the node does not read TF).",
              check=lambda v: None if sum(q * q for q in v[3:]) > 1e-12 else
              "the quaternion (qx, qy, qz, qw) must not be zero"),
    ParamSpec("alignment.tolerance_s", 0.1,
              "Largest stamp difference between a frame and the sparse message it is fitted to.",
              min=0.0, max=10.0),
    ParamSpec("alignment.min_points", 20,
              "Fewest valid sparse points for a fit; with fewer, the frame gets no metric depth.",
              min=3, max=10_000_000),
    ParamSpec("alignment.min_inlier_fraction", 0.5,
              "Fits keeping fewer inliers than this fraction of the points are rejected.",
              min=0.0, max=1.0),
    # --- input ---
    ParamSpec("input.max_pixels", 4096 * 4096,
              "Largest accepted image (width x height); larger ones are refused.",
              min=1, max=INT32_MAX),
    ParamSpec("input.max_image_age_s", 2.0,
              "Frames whose header stamp is older than this (against the node clock) are "
              "skipped and refused by the service; 0 = no limit.", min=0.0, max=86400.0),
    ParamSpec("input.compressed", True,
              "Also subscribe to <image topic>/compressed (sensor_msgs/CompressedImage, JPEG/PNG)."),
    ParamSpec("input.rectified", False,
              "The image is rectified (e.g. image_rect): ~/points back-projects with the "
              "camera_info's P. False (image_raw): pixel rays are undistorted with K and D "
              "(plumb_bob, rational_polynomial, equidistant)."),
    ParamSpec("input.camera_info_tolerance_s", 0.005,
              "A frame is paired with the camera_info of the nearest stamp within this many "
              "seconds; without one its ~/points and ~/depth/camera_info are skipped (counted).",
              min=0.0, max=10.0),
    ParamSpec("input.reliability", "best_effort",
              "Reliability of the image subscriptions. best_effort receives from both kinds of "
              "publisher; reliable only from reliable ones.", choices=("best_effort", "reliable")),
    # --- query service ---
    ParamSpec("query.service_name", "/spatial_query", "Name of the SpatialQuery service.",
              pattern=r"[~/]?[A-Za-z_][A-Za-z0-9_/]*"),
    ParamSpec("query.action_name", "/spatial_query_stream",
              "Name of the SpatialQuery action (streams reasoning turns as feedback); empty = off.",
              pattern=r"([~/]?[A-Za-z_][A-Za-z0-9_/]*)?"),
    ParamSpec("query.default_mode", "interleave",
              "Reasoning mode used when a request leaves `mode` empty.", choices=MODES),
    ParamSpec("query.max_turns", 3, "Default maximum reasoning turns (a request's max_turns=0).",
              min=1, max=16),
    ParamSpec("query.max_question_chars", 4000, "Longest accepted question, in characters.",
              min=1, max=1_000_000),
    ParamSpec("query.max_new_tokens", 0, "Token budget per reasoning turn; 0 = model default.",
              min=0, max=65536),
    ParamSpec("query.return_images", True,
              "Return the generated auxiliary maps in the response."),
    # --- misc ---
    ParamSpec("diagnostics.period_s", 1.0, "Period of /diagnostics messages.", min=0.05, max=3600.0),
    ParamSpec("lifecycle.autostart", True,
              "When started as a program: configure and activate at once (false = wait for a "
              "lifecycle manager)."),
]

SPEC_BY_NAME = {p.name: p for p in PARAMS}

# changing these while the node is configured is refused (they are applied at configure)
RECONFIGURE_ONLY = {"model.checkpoint", "model.device", "model.dtype", "model.backend",
                    "model.device_map", "model.cpu_threads", "query.service_name", "query.action_name",
                    "input.reliability", "input.compressed", "alignment.source"}


def check_value(name: str, value: Any) -> str | None:
    """Reason why ``value`` is not valid for parameter ``name``, or None when it is."""
    spec = SPEC_BY_NAME.get(name)
    if spec is None:
        return None  # not ours (use_sim_time, ...)
    t = spec.type
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if t is list:  # double arrays (rclpy hands them over as list or array.array)
        try:
            value = [float(x) for x in value]
        except (TypeError, ValueError):
            return f"{name} must be a list of numbers, got {value!r}"
        n = len(spec.default)
        if len(value) != n:
            return f"{name} must have {n} numbers, got {len(value)}"
        why = spec.check(value) if spec.check else None
        return f"{name}={value!r}: {why}" if why else None
    if type(value) is not t:
        return (f"{name} must be of type {t.__name__}, got {type(value).__name__} "
                f"({value!r})")
    if spec.min is not None and value < spec.min:
        return f"{name}={value!r} is below the minimum {spec.min}"
    if spec.max is not None and value > spec.max:
        return f"{name}={value!r} is above the maximum {spec.max}"
    if spec.choices is not None and value not in spec.choices:
        return f"{name}={value!r} is not one of {', '.join(map(repr, spec.choices))}"
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        return f"{name}={value!r} does not match {spec.pattern!r}"
    if spec.check is not None:
        why = spec.check(value)
        if why:
            return f"{name}={value!r}: {why}"
    return None


def check_consistency(values: dict[str, Any]) -> str | None:
    """Cross-parameter checks on a complete {name: value} set (and sentinel rules)."""
    if values.get("generation.num_steps", 0) == 1:
        return "generation.num_steps must be 0 (model default) or at least 2"
    for k in ("generation.cfg_text_scale", "generation.cfg_img_scale"):
        v = values.get(k, -1.0)
        if v < 0 and v != -1.0:
            return f"{k}={v}: use -1 for the model default or a scale >= 0"
    v = values.get("generation.timestep_shift", -1.0)
    if v != -1.0 and v <= 0:
        return f"generation.timestep_shift={v}: use -1 for the model default or a value > 0"
    lo, hi = values.get("depth.min_m", 0.0), values.get("depth.max_m", 0.0)
    if lo > 0 and hi > 0 and lo >= hi:
        return f"depth.min_m ({lo}) must be smaller than depth.max_m ({hi})"
    a, b = values.get("generation.cfg_interval_start", -1.0), values.get("generation.cfg_interval_end", -1.0)
    if (a < 0) != (b < 0):
        return ("generation.cfg_interval_start and generation.cfg_interval_end must both be set "
                "(0..1) or both be -1 (model default)")
    if a >= 0 and b >= 0 and a > b:
        return f"generation.cfg_interval_start ({a}) must not exceed cfg_interval_end ({b})"
    return None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_params_file(path: str, node_name: str = "cooper") -> dict[str, Any]:
    """Read a ROS 2 parameters YAML and return the flattened parameters for ``node_name``.

    Sections ``/**``, ``<node_name>`` and ``/<node_name>`` (with or without namespace wildcard)
    apply, later ones winning, as in rcl.
    """
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    out: dict[str, Any] = {}
    for key in ("/**", "**", node_name, f"/{node_name}", f"/**/{node_name}"):
        sec = doc.get(key)
        if isinstance(sec, dict) and isinstance(sec.get("ros__parameters"), dict):
            out.update(_flatten(sec["ros__parameters"]))
    return out


@dataclass
class Settings:
    """Typed snapshot of the parameters (read under the node's lock)."""
    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, k):
        return self.values[k]

    def generation_overrides(self, for_query: bool = False) -> dict[str, Any]:
        v = self.values
        o: dict[str, Any] = {}
        if v["generation.num_steps"] > 0:
            o["num_steps"] = int(v["generation.num_steps"])
        if v["generation.cfg_text_scale"] >= 0:
            o["cfg_text_scale"] = float(v["generation.cfg_text_scale"])
        if v["generation.cfg_img_scale"] >= 0:
            o["cfg_img_scale"] = float(v["generation.cfg_img_scale"])
        if v["generation.cfg_interval_start"] >= 0 and v["generation.cfg_interval_end"] >= 0:
            o["cfg_interval"] = (float(v["generation.cfg_interval_start"]),
                                 float(v["generation.cfg_interval_end"]))
        if v["generation.timestep_shift"] >= 0:
            o["timestep_shift"] = float(v["generation.timestep_shift"])
        if v["generation.seed"] >= 0:
            o["seed"] = int(v["generation.seed"])
        if v["generation.vae_resolution"] > 0:
            o["vae_resolution"] = int(v["generation.vae_resolution"])
        if v["generation.vit_resolution"] > 0:
            o["vit_resolution"] = int(v["generation.vit_resolution"])
        if for_query and v["query.max_new_tokens"] > 0:
            o["max_new_tokens"] = int(v["query.max_new_tokens"])
        return o


def render_yaml() -> str:
    """The default parameters file (config/cooper.yaml) as generated from PARAMS.

    Regenerate with: python -m cooper_ros.params > cooper_ros/config/cooper.yaml
    """
    import json
    import textwrap

    lines = ["# Parameters of the cooper node (cooper_ros). One file for every way of starting it:",
             "#   ros2 launch cooper_ros cooper.launch.py params_file:=<this file>",
             "#   python -m cooper_ros.node --ros-args --params-file <this file> -r image:=/camera/image_raw",
             "# Each parameter is declared with this description and range; invalid values are refused",
             "# at start and at set_parameters, with the reason. Generated by `python -m cooper_ros.params`",
             "# from cooper_ros/params.py.",
             "/**:", "  ros__parameters:"]
    groups: dict[str, list] = {}
    for p in PARAMS:
        g, k = p.name.split(".", 1)
        groups.setdefault(g, []).append((k, p))
    for g, items in groups.items():
        lines.append(f"    {g}:")
        for k, p in items:
            rng = ""
            if p.choices:
                rng = " [" + " | ".join(p.choices) + "]"
            elif p.min is not None:
                rng = f" [{p.min} .. {p.max}]"
            for line in textwrap.wrap(p.description + rng, 88):
                lines.append(f"      # {line}")
            if isinstance(p.default, bool):
                v = "true" if p.default else "false"
            elif isinstance(p.default, str):
                v = json.dumps(p.default)
            else:
                v = repr(p.default)
            lines.append(f"      {k}: {v}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_yaml(), end="")
