"""The pipeline API end to end on the bundled small checkpoint (CPU, few steps)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cooper_model import BUNDLED_CHECKPOINT, CooperInputError, CooperPipeline, DepthCodec, SegmentationCodec, default_palette
from cooper_model.codecs import colorize_depth
from cooper_model.reasoning import extract_boxed

FAST = dict(num_steps=3, max_new_tokens=12)


@pytest.fixture(scope="module")
def pipe():
    return CooperPipeline.from_pretrained(BUNDLED_CHECKPOINT)


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (120, 170, 3), dtype=np.uint8)


def test_depth_at_input_resolution(pipe, rgb):
    out = pipe.depth(rgb, **FAST)
    assert out.depth.shape == (120, 170) and out.depth.dtype == np.float32
    assert out.colored.shape == (120, 170, 3) and out.colored.dtype == np.uint8
    lo, hi = pipe.depth_range
    finite = np.isfinite(out.depth)
    assert ((out.depth[finite] >= lo) & (out.depth[finite] <= hi)).all()
    # saturated pixels follow REP 118: -inf nearer, +inf farther than the range
    assert np.array_equal(np.isneginf(out.depth), out.depth01 <= 0)
    assert np.array_equal(np.isposinf(out.depth), out.depth01 >= 1)
    assert {"prefill", "denoise", "vae_decode", "total"} <= set(out.timings)


def test_same_seed_same_map_other_seed_other_map(pipe, rgb):
    a, b, c = (pipe.depth(rgb, seed=s, **FAST).depth01 for s in (1, 1, 2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_segmentation_labels_are_palette_ids(pipe, rgb):
    out = pipe.segment(rgb, **FAST)
    assert out.labels.shape == (120, 170) and out.labels.dtype == np.uint16
    assert out.labels.max() < len(pipe.palette)
    assert np.array_equal(out.color, pipe.palette[out.labels])
    assert pipe.class_names[0] == "background"


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


def test_colorize_depth_is_spectral():
    import matplotlib

    out = colorize_depth(np.array([[0.0, 1.0]]))
    ref = (np.array(matplotlib.colormaps["Spectral"]([0.0, 1.0]))[:, :3] * 255).astype(np.uint8)
    assert np.array_equal(out[0], ref)


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
