"""Dataset readers on tiny fixtures written here in each dataset's native on-disk format."""

import base64
import io
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from training.data.geometry import Intrinsics, distance_to_planar
from training.data.readers import (MissingDataError, read_ade20k, read_cooper_rl, read_cooper_sft,
                                   read_cooper_stage1, read_hypersim, read_nyuv2, read_synth, read_vkitti2)
from training.data.schema import Sample

H, W = 12, 16
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (H, W, 3), dtype=np.uint8)
SMOOTH = np.stack(np.broadcast_arrays(np.arange(W)[None] * 12, np.arange(H)[:, None] * 16, 90), -1).astype(np.uint8)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _h5(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset", data=arr)


def test_hypersim_distance_becomes_planar_depth(tmp_path):
    scene = tmp_path / "ai_001_002" / "images"
    planar = RNG.uniform(1, 5, (H, W)).astype(np.float32)
    intr = Intrinsics(886.81 * W / 1024, 886.81 * W / 1024, W / 2, H / 2, W, H)
    # Distance along each pixel's ray = planar depth x ray length.
    u = (np.arange(W) + 0.5 - intr.cx) / intr.fx
    v = (np.arange(H) + 0.5 - intr.cy) / intr.fy
    distance = planar * np.sqrt(u[None] ** 2 + v[:, None] ** 2 + 1)
    _h5(scene / "scene_cam_00_geometry_hdf5" / "frame.0003.depth_meters.hdf5", distance.astype(np.float16))
    sem = RNG.integers(-1, 41, (H, W)).astype(np.int16)
    _h5(scene / "scene_cam_00_geometry_hdf5" / "frame.0003.semantic.hdf5", sem)
    _h5(scene / "scene_cam_00_final_hdf5" / "frame.0003.color.hdf5", RNG.uniform(0, 2, (H, W, 3)).astype(np.float16))
    (s,) = list(read_hypersim(tmp_path))
    assert s.depth == pytest.approx(planar, rel=2e-3)  # float16 storage
    assert s.rgb.shape == (H, W, 3) and s.rgb.dtype == np.uint8
    assert np.array_equal(s.class_map, np.maximum(sem, 0)) and s.class_names[7] == "table"
    assert s.intrinsics.width == W and s.depth_range == (1e-5, 65.0)
    # With the tonemapped preview present the reader uses it.
    _png(scene / "scene_cam_00_final_preview" / "frame.0003.tonemap.jpg", SMOOTH)
    (s,) = list(read_hypersim(tmp_path))
    assert np.abs(s.rgb.astype(int) - SMOOTH).mean() < 8  # JPEG


def test_hypersim_missing_rgb_is_named(tmp_path):
    _h5(tmp_path / "ai_001_001" / "images" / "scene_cam_00_geometry_hdf5" / "frame.0000.depth_meters.hdf5",
        np.ones((H, W), np.float16))
    with pytest.raises(MissingDataError, match="color.hdf5"):
        list(read_hypersim(tmp_path))
    with pytest.raises(MissingDataError, match="Hypersim"):
        list(read_hypersim(tmp_path / "nothing"))


def test_vkitti2_depth_png_in_centimetres(tmp_path):
    var = tmp_path / "Scene01" / "clone"
    cm = RNG.integers(100, 8000, (H, W)).astype(np.uint16)
    cm[0, :] = 65535  # sky
    _png(var / "frames" / "depth" / "Camera_0" / "depth_00007.png", cm)
    _png(var / "frames" / "rgb" / "Camera_0" / "rgb_00007.jpg", SMOOTH)
    seg = np.zeros((H, W, 3), np.uint8)
    seg[:, : W // 2] = (200, 0, 0)
    seg[:, W // 2:] = (0, 90, 200)
    _png(var / "frames" / "classSegmentation" / "Camera_0" / "classgt_00007.png", seg)
    (var / "colors.txt").write_text("Category r g b\nCar 200 0 0\nRoad 0 90 200\n")
    (var / "intrinsic.txt").write_text("frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]\n"
                                       "7 0 725.0087 725.0087 620.5 187\n7 1 725.0087 725.0087 620.5 187\n")
    (s,) = list(read_vkitti2(tmp_path))
    assert np.isnan(s.depth[0]).all()
    assert s.depth[1:] == pytest.approx(cm[1:] / 100.0)
    assert s.intrinsics.fx == pytest.approx(725.0087) and s.intrinsics.cy == 187
    assert s.class_names == ["unlabeled", "Car", "Road"]
    assert (s.class_map[:, : W // 2] == 1).all() and (s.class_map[:, W // 2:] == 2).all()


def test_nyuv2_labelled_mat(tmp_path):
    n = 2
    images = RNG.integers(0, 255, (n, 3, W, H), dtype=np.uint8)  # MATLAB column-major, as h5py sees it
    depths = RNG.uniform(0.5, 9, (n, W, H)).astype(np.float32)
    labels = RNG.integers(0, 3, (n, W, H)).astype(np.uint16)
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w") as f:
        f["images"], f["depths"], f["labels"] = images, depths, labels
        refs = []
        for i, name in enumerate(["bed", "lamp"]):
            f[f"#refs#/{i}"] = np.array([[ord(c)] for c in name], np.uint16)
            refs.append(f[f"#refs#/{i}"].ref)
        f.create_dataset("names", data=np.array([refs]), dtype=h5py.ref_dtype)
    samples = list(read_nyuv2(path))
    assert len(samples) == n
    s = samples[1]
    assert s.rgb.shape == (H, W, 3) and np.array_equal(s.rgb, images[1].transpose(2, 1, 0))
    assert np.array_equal(s.depth, depths[1].T) and np.array_equal(s.class_map, labels[1].T)
    assert s.class_names == ["unlabeled", "bed", "lamp"] and s.intrinsics.width == 640
    with pytest.raises(MissingDataError, match="nyu"):
        list(read_nyuv2(tmp_path / "missing.mat"))


def test_ade20k_scene_parsing_layout(tmp_path):
    _png(tmp_path / "images" / "validation" / "ADE_val_00000001.jpg", SMOOTH)
    ann = RNG.integers(0, 151, (H, W)).astype(np.uint8)
    _png(tmp_path / "annotations" / "validation" / "ADE_val_00000001.png", ann)
    (tmp_path / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\n2,0.1,1,1,building;edifice\n")
    (s,) = list(read_ade20k(tmp_path, "validation"))
    assert np.array_equal(s.class_map, ann) and s.class_names == ["other", "wall", "building"]
    with pytest.raises(MissingDataError, match="ADE20K"):
        list(read_ade20k(tmp_path, "training"))


def _b64(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_cooper_jsonl_files(tmp_path):
    _png(tmp_path / "img" / "a.png", RGB)
    _png(tmp_path / "img" / "a_depth.png", np.full((H, W), 2500, np.uint16))
    (tmp_path / "train.jsonl").write_text(json.dumps({"rgb_image": "img/a.png", "depth_image": "img/a_depth.png"}) + "\n")
    (s,) = list(read_cooper_stage1(tmp_path / "train.jsonl", tmp_path, "hypersim"))
    assert np.allclose(s.depth, 2.5) and np.array_equal(s.rgb, RGB)
    (s,) = list(read_cooper_stage1(tmp_path / "train.jsonl", tmp_path, "vkitti"))
    assert np.allclose(s.depth, 25.0)  # vKITTI PNGs are centimetres

    trace = [{"type": "image", "value": _b64(RGB), "need_loss": "false"},
             {"type": "text", "value": "How many chairs?", "need_loss": "false"},
             {"type": "text", "value": "<think>two</think><answer>\\boxed{2}</answer>", "need_loss": "true"}]
    (tmp_path / "sft.jsonl").write_text(json.dumps({"interleaved_reason": trace}) + "\n")
    (s,) = list(read_cooper_sft(tmp_path / "sft.jsonl"))
    assert np.array_equal(s.rgb, RGB) and s.questions[0]["answer"] == "2"

    (tmp_path / "rl.jsonl").write_text(json.dumps({"question": "q", "answer": "A", "image": "img/a.png",
                                                   "data_id": 5, "flag": "positive"}) + "\n")
    (s,) = list(read_cooper_rl(tmp_path / "rl.jsonl", tmp_path))
    assert s.questions[0]["flag"] == "positive" and np.array_equal(s.rgb, RGB)
    with pytest.raises(MissingDataError, match="RL image"):
        list(read_cooper_rl(tmp_path / "rl.jsonl", tmp_path / "elsewhere"))


def test_sample_round_trip_and_committed_sample(tmp_path):
    depth = RNG.uniform(0.5, 9, (H, W)).astype(np.float32)
    depth[0, 0] = np.nan
    s = Sample("x", "test", RGB, depth=depth, class_map=np.ones((H, W), np.int32),
               intrinsics=Intrinsics(10, 10, 8, 6, W, H), cam_to_world=np.eye(4), depth_range=(0.001, 10))
    s.save(tmp_path / "x")
    t = Sample.load(tmp_path / "x")
    assert np.isnan(t.depth[0, 0]) and np.nanmax(np.abs(t.depth - depth)) <= 0.0005  # millimetres
    assert t.intrinsics == s.intrinsics and np.array_equal(t.rgb, RGB)
    # The sample shipped in the repo reads back with full ground truth.
    from pathlib import Path

    shipped = list(read_synth(Path(__file__).parents[1] / "training" / "data" / "sample"))
    assert len(shipped) >= 4
    for v in shipped:
        assert v.depth is not None and v.instance_map is not None and v.questions and v.objects
