"""The pipeline API end to end on the bundled small checkpoint (CPU, few steps)."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REFERENCE
from cooper_model import BUNDLED_CHECKPOINT, CooperInputError, CooperPipeline, DepthCodec, SegmentationCodec, default_palette
from cooper_model.codecs import colorize_depth
from cooper_model.config import CooperConfig, preset
from cooper_model.reasoning import extract_boxed
from cooper_model.tokenizer import byte_level_tokenizer

FAST = dict(num_steps=3, max_new_tokens=12)


@pytest.fixture(scope="module")
def pipe():
    return CooperPipeline.from_pretrained(BUNDLED_CHECKPOINT)


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (120, 170, 3), dtype=np.uint8)


def with_config(pipe, **changes) -> CooperPipeline:
    """The same weights under another declaration (depth kind, palette)."""
    return CooperPipeline(pipe.inferencer, dataclasses.replace(pipe.config, **changes))


def test_depth_at_input_resolution(pipe, rgb):
    assert pipe.depth_is_metric  # cooper-small is trained on metric synthetic data
    out = pipe.depth(rgb, **FAST)
    assert out.relative.shape == (120, 170) and out.relative.dtype == np.float32
    assert ((out.relative >= 0) & (out.relative <= 1)).all()
    assert out.depth.shape == (120, 170) and out.depth.dtype == np.float32
    assert out.colored.shape == (120, 170, 3) and out.colored.dtype == np.uint8
    assert np.array_equal(out.colored, colorize_depth(out.relative))
    lo, hi = pipe.depth_range
    finite = np.isfinite(out.depth)
    assert ((out.depth[finite] >= lo) & (out.depth[finite] <= hi)).all()
    # metres are the relative map under the checkpoint's fixed range: larger = farther
    np.testing.assert_allclose(out.depth[finite], lo + out.relative[finite] * (hi - lo), rtol=1e-6)
    # saturated pixels follow REP 118: -inf nearer, +inf farther than the range
    assert np.array_equal(np.isneginf(out.depth), out.relative <= 0)
    assert np.array_equal(np.isposinf(out.depth), out.relative >= 1)
    assert {"prefill", "denoise", "vae_decode", "total"} <= set(out.timings)


def test_relative_depth_checkpoint_gives_no_metres(pipe, rgb):
    relative = with_config(pipe, depth_kind="relative")
    assert not relative.depth_is_metric
    out = relative.depth(rgb, seed=3, **FAST)
    assert out.depth is None
    # the same map as the metric declaration gives: only what it is called changes
    assert np.array_equal(out.relative, pipe.depth(rgb, seed=3, **FAST).relative)


def test_same_seed_same_map_other_seed_other_map(pipe, rgb):
    a, b, c = (pipe.depth(rgb, seed=s, **FAST).relative for s in (1, 1, 2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("task", ["depth", "segment"])
def test_should_stop_is_asked_between_stages_and_interrupts(pipe, rgb, task):
    """``should_stop`` is asked after the prefill / before each denoising step and once before
    the decode; the first True stops the call with GenerationInterrupted, and the pipeline then
    works as before (its lock is released, the same seed gives the same map)."""
    from cooper_model import GenerationInterrupted

    call = getattr(pipe, task)
    asked = []
    reference = call(rgb, seed=5, **FAST)
    same = call(rgb, seed=5, should_stop=lambda: asked.append(1) and False, **FAST)
    # num_steps - 1 Euler steps (the first right after the prefill), then once before the decode
    assert len(asked) == FAST["num_steps"]
    for field in ("relative", "raw"):
        if hasattr(reference, field):
            assert np.array_equal(getattr(same, field), getattr(reference, field))
    for stop_at in range(1, len(asked) + 1):
        n = []
        with pytest.raises(GenerationInterrupted):
            call(rgb, seed=5, should_stop=lambda: n.append(1) or len(n) >= stop_at, **FAST)
        assert len(n) == stop_at                 # nothing more was asked (nor computed) after True
    again = call(rgb, seed=5, **FAST)
    for field in ("relative", "raw"):
        if hasattr(reference, field):
            assert np.array_equal(getattr(again, field), getattr(reference, field))


def test_segmentation_labels_are_palette_ids(pipe, rgb):
    assert pipe.has_palette
    out = pipe.segment(rgb, **FAST)
    assert out.raw.shape == (120, 170, 3) and out.raw.dtype == np.uint8
    assert out.labels.shape == (120, 170) and out.labels.dtype == np.uint16
    assert out.labels.max() < len(pipe.palette)
    assert np.array_equal(out.color, pipe.palette[out.labels])
    assert np.array_equal(out.labels, SegmentationCodec(pipe.palette).decode(out.raw))
    assert pipe.class_names[0] == "background" and len(pipe.class_names) == len(pipe.palette)


def test_segmentation_without_palette_is_colours_only(pipe, rgb):
    bare = with_config(pipe, class_names=None, palette=None)
    assert not bare.has_palette and bare.class_names is None and bare.palette is None
    out = bare.segment(rgb, seed=4, **FAST)
    assert out.labels is None and out.color is None
    # the generated colours, not re-quantised to any palette
    assert np.array_equal(out.raw, pipe.segment(rgb, seed=4, **FAST).raw)


def test_segmentation_raw_is_the_generated_map_nearest_resized(pipe, rgb, monkeypatch):
    # a generated map whose every pixel has its own colour (row in red, column in green), more
    # colours than any palette: raw must show them unchanged, each from the pixel under it
    import torch

    h, w = 64, 96
    generated = np.zeros((h, w, 3), np.uint8)
    generated[..., 0] = np.arange(h)[:, None] * 4
    generated[..., 1] = np.arange(w)[None, :] * 2
    decoded = torch.from_numpy((generated + 0.5) / 255 * 2 - 1).permute(2, 0, 1).float()  # decoder range
    monkeypatch.setattr(pipe.inferencer, "decode_latents", lambda latents, hh, ww: decoded)
    raw = pipe.segment(rgb, **FAST).raw
    assert raw.shape == (120, 170, 3) and (raw[..., 2] == 0).all()
    src_row, src_col = raw[..., 0].astype(int) // 4, raw[..., 1].astype(int) // 2
    assert np.array_equal(raw, generated[src_row, src_col])  # no blended colour anywhere
    centre_row = (np.arange(120) + 0.5) * h / 120
    centre_col = (np.arange(170) + 0.5) * w / 170
    assert (np.abs(src_row + 0.5 - centre_row[:, None]) <= 1).all()
    assert (np.abs(src_col + 0.5 - centre_col[None, :]) <= 1).all()


def test_released_checkpoint_is_relative_without_palette(rgb):
    # a released-style checkpoint (upstream's files, no cooper_config.json)
    tiny = REFERENCE / "bagel-tiny-ckpt"
    assert not (tiny / "cooper_config.json").exists()
    pipe = CooperPipeline.from_pretrained(tiny, tokenizer=byte_level_tokenizer())
    assert pipe.config.depth_kind == "relative" and not pipe.depth_is_metric
    assert not pipe.has_palette and pipe.class_names is None and pipe.palette is None
    depth = pipe.depth(rgb, num_steps=2)
    assert depth.depth is None and depth.relative.shape == (120, 170)
    seg = pipe.segment(rgb, num_steps=2)
    assert seg.labels is None and seg.color is None and seg.raw.shape == (120, 170, 3)


def test_depth_kind_is_declared_and_checked(tmp_path):
    assert preset("cooper-small").depth_kind == "metric"
    assert preset("bagel-7b").depth_kind == "relative"
    bundled = json.loads((BUNDLED_CHECKPOINT / "cooper_config.json").read_text())
    assert bundled["depth_kind"] == "metric"
    # a trained project checkpoint names its stages (None would claim a released, fully trained one)
    assert not bundled.get("trained", True) or bundled["trained_stages"] is not None
    config = preset("cooper-small")
    config.save_pretrained(tmp_path)
    assert CooperConfig.from_pretrained(tmp_path).depth_kind == "metric"
    extra = json.loads((tmp_path / "cooper_config.json").read_text())
    extra["depth_kind"] = "metres"
    (tmp_path / "cooper_config.json").write_text(json.dumps(extra))
    with pytest.raises(ValueError, match="cooper_config.json: depth_kind must be one of"):
        CooperConfig.from_pretrained(tmp_path)
    extra["depth_kind"] = "relative"
    extra["palette"] = None
    extra["class_names"] = ["background", "chair"]
    (tmp_path / "cooper_config.json").write_text(json.dumps(extra))
    with pytest.raises(ValueError, match="class_names without a palette"):
        CooperConfig.from_pretrained(tmp_path)


def test_standalone_defaults_are_coopers_evaluation(pipe):
    bare = with_config(pipe, pipeline_defaults={})
    seg = bare.settings("segment")  # ADE20K evaluation (`image_generation_edit`)
    assert (seg.cfg_text_scale, seg.cfg_img_scale, seg.cfg_interval, seg.num_steps) == (3.0, 1.5, (0.4, 1.0), 50)
    depth = bare.settings("depth")  # depth evaluation (`depth_map_generation`)
    assert (depth.cfg_text_scale, depth.cfg_img_scale, depth.cfg_interval, depth.num_steps) == (3.0, 1.5, (0.4, 1.0), 50)


@pytest.mark.parametrize("mode", ["interleave", "text", "perception", "direct"])
def test_ask_every_mode(pipe, rgb, mode):
    events = []
    out = pipe.ask(rgb, "How far is the chair from the table?", mode=mode, on_event=lambda *e: events.append(e), **FAST)
    assert out.mode == mode and isinstance(out.answer, str) and len(out.turns) >= 1
    # progress is reported live, in order: every turn and every generated map
    assert [v for k, v in events if k == "turn"] == out.turns
    assert [v for k, v in events if k == "tool"] == out.tools_used
    if mode == "perception":
        assert out.tools_used == ["depth", "segmentation"]
        assert [kind for kind, _ in out.images] == ["depth", "segmentation"]
        assert out.answer.startswith("<answer>")
    assert "total" in out.timings


@pytest.mark.parametrize("bad,error", [
    (np.zeros((10, 10), np.uint8), "HxWx3"),
    (np.zeros((10, 10, 3), np.float32), "uint8"),
    (np.zeros((0, 10, 3), np.uint8), "too small"),
    ("not an image", "numpy array"),
])
def test_bad_images_are_refused(pipe, bad, error):
    with pytest.raises(CooperInputError, match=error):
        pipe.depth(bad, **FAST)


def test_bad_questions_modes_and_settings_are_refused(pipe, rgb):
    with pytest.raises(CooperInputError, match="empty"):
        pipe.ask(rgb, "   ")
    with pytest.raises(CooperInputError, match="characters"):
        pipe.ask(rgb, "x" * 100_000)
    with pytest.raises(CooperInputError, match="unknown mode"):
        pipe.ask(rgb, "hi", mode="telepathy")
    with pytest.raises(CooperInputError, match="unknown settings"):
        pipe.depth(rgb, steps=3)
    with pytest.raises(CooperInputError, match="cfg_interval"):
        pipe.depth(rgb, cfg_interval=(0.9, 0.1))
    with pytest.raises(CooperInputError, match="num_steps"):
        pipe.depth(rgb, num_steps=1)


def test_resolution_beyond_the_position_tables_is_a_clear_error(pipe, rgb):
    # cooper-small's latent table covers 16x16 patches (256 px); upstream would index out of bounds
    with pytest.raises(ValueError, match="position table covers 16x16"):
        pipe.depth(np.zeros((480, 640, 3), np.uint8), vae_resolution=4096, **FAST)


def test_huge_image_is_refused_before_work(pipe):
    big = np.zeros((8000, 8000, 3), np.uint8)
    with pytest.raises(CooperInputError, match="exceeds"):
        pipe.depth(big)


def test_depth_codec_round_trip_and_range():
    codec = DepthCodec(0.5, 10.5)
    depth = np.array([[0.5, 5.5], [10.5, np.nan]], np.float32)
    img = codec.encode(depth)
    assert img.shape == (2, 2, 3) and (img[..., 0] == img[..., 1]).all()
    assert img[0, 0, 0] == 0 and img[1, 0, 0] == 255 and img[1, 1, 0] == 0  # NaN encodes like a 0 reading
    back = codec.decode(img)
    assert np.isneginf(back[0, 0]) and np.isposinf(back[1, 0])
    assert abs(back[0, 1] - 5.5) <= 10 / 255
    with pytest.raises(ValueError):
        DepthCodec(5, 1)


def test_segmentation_codec_nearest_colour():
    palette = default_palette(6)
    codec = SegmentationCodec(palette)
    labels = np.array([[0, 1, 2], [3, 4, 5]])
    colour = codec.encode(labels).astype(np.int16)
    noisy = np.clip(colour + np.random.default_rng(0).integers(-12, 13, colour.shape), 0, 255).astype(np.uint8)
    assert np.array_equal(codec.decode(noisy), labels)
    assert len(np.unique(palette, axis=0)) == 6 and palette[0].tolist() == [0, 0, 0]


def test_colorize_depth_is_upstreams_spectral():
    import matplotlib
    import torch

    d = (np.arange(256, dtype=np.float32) + 0.5) / 256  # one value in each of Spectral's 256 bins
    out = colorize_depth(d[None])[0]
    # upstream: `colorize_depth_maps` hands a tensor's colours back as float32, then `* 255` to uint8
    colours = matplotlib.colormaps["Spectral"](d, bytes=False)[..., :3]
    upstream = (torch.from_numpy(colours).float().numpy() * 255).astype(np.uint8)
    assert np.array_equal(out, upstream)
    # in float64 two bins' blue would truncate one level lower (86 and 110)
    assert out[68, 2] == 87 and out[85, 2] == 111
    assert (colours[[68, 85], 2] * 255).astype(np.uint8).tolist() == [86, 110]
    assert colorize_depth(np.array([[np.nan, np.inf]])).tolist() == [[[0, 0, 0], [0, 0, 0]]]


def test_transparent_input_is_composited_onto_white(pipe):
    from PIL import Image

    from cooper_model import image_processor as ip

    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (40, 60, 4), dtype=np.uint8)
    rgba[:10, :, 3], rgba[10:20, :, 3], rgba[20:, :, 3] = 0, 128, 255
    out = np.asarray(ip.as_pil_rgb(rgba)).astype(int)
    alpha = rgba[..., 3:].astype(float) / 255
    blend = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert (out[:10] == 255).all()  # fully transparent: white, whatever colour is hidden there
    assert np.abs(out - blend).max() <= 1
    assert np.array_equal(out[20:], rgba[20:, :, :3])
    # PIL images: RGBA, greyscale with alpha, and a palette with a transparent index
    assert np.array_equal(np.asarray(ip.as_pil_rgb(Image.fromarray(rgba, "RGBA"))), out)
    la = Image.fromarray(np.stack([np.full((2, 2), 40, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], -1), "LA")
    assert np.asarray(ip.as_pil_rgb(la))[..., 0].tolist() == [[255, 40], [40, 255]]
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60])
    pal.info["transparency"] = 1
    assert np.asarray(ip.as_pil_rgb(pal)).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    # the pipeline sees the composited image
    composited = np.asarray(ip.as_pil_rgb(rgba))
    assert np.array_equal(pipe.depth(rgba, **FAST).relative, pipe.depth(composited, **FAST).relative)
    with pytest.raises(CooperInputError, match="HxWx3"):
        pipe.depth(np.zeros((10, 10, 2), np.uint8))


def test_extract_boxed():
    assert extract_boxed(r"<answer>so \boxed{2.5 m}</answer>") == "2.5 m"
    assert extract_boxed(r"\boxed{a} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed("no box") is None


def test_bench_prints_json():
    out = subprocess.run([sys.executable, "-m", "cooper_model.bench", "--json", "--repeat", "1", "--steps", "2",
                          "--size", "64", "--text-tokens", "4"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("vit_encode_s", "vae_encode_s", "prefill_s", "denoise_step_1branch_s", "denoise_step_3branch_s",
                "vae_decode_s", "depth_map_s", "text_tokens_per_s"):
        assert result[key] > 0
