"""The synth writer: COOPER formats, determinism, resume after an interrupt, dataset card."""

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from cooper_model.codecs import DepthCodec
from cooper_model.prompts import DEPTH_PROMPT, REFLECTION_PROMPT, SEGMENTATION_PROMPT
from training.data.questions import TOOL, score
from training.data.readers import read_synth
from training.data.synth import generate, main
from training.data.traces import SEG_CODEC

CFG = dict(num_scenes=3, views=2, seed=5, split="train", width=64, height=48, questions=6, traces=6,
           progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    card = generate(str(out), workers=2, **CFG)
    return out / "train", card


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _img(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_layout_and_card(dataset):
    root, card = dataset
    for name in ("questions.jsonl", "Interleaved_SFT.jsonl", "RL_data.jsonl", "stage1.jsonl", "manifest.json",
                 "card.md", "card.json", "depth_hist.png", "distance_hist.png", "categories.png"):
        assert (root / name).exists(), name
    assert card["views"] == 6 and len(_rows(root / "stage1.jsonl")) == 12
    questions = _rows(root / "questions.jsonl")
    assert sum(card["questions_per_category"].values()) == len(questions)
    frames = json.loads((root / "manifest.json").read_text())["frames"]
    assert len(frames) == 6 and {"fx", "fy", "cx", "cy", "width", "height"} <= set(frames[0])
    assert Image.open(root / "depth_hist.png").size[0] > 100


def test_sft_traces_follow_cooper_schema(dataset):
    root, _ = dataset
    samples = {s.sample_id: s for s in read_synth(root)}
    rows = _rows(root / "Interleaved_SFT.jsonl")
    tools, modes = set(), {}
    for r in rows:
        items = r["interleaved_reason"]
        assert all(it["need_loss"] in ("true", "false") for it in items)
        assert items[0]["type"] == "image" and items[1]["type"] == "text"
        last = items[-1]["value"]
        assert items[-1]["need_loss"] == "true"
        tool, mode = r["tool"], r.get("mode", "interleave")  # COOPER's own rows carry no mode
        qid = r["data_id"].removesuffix(f"_{mode}")
        modes.setdefault(qid, []).append(mode)
        sample = samples[qid.rsplit("_q", 1)[0]]
        q = next(q for q in sample.questions if q["qid"] == qid)
        assert tool == TOOL[q["category"]]
        if mode == "perception":  # both maps, then the loop's own "<answer>" prompt; the answer is trained
            assert [it["type"] for it in items] == ["image", "text", "text", "image", "text", "image", "text", "text"]
            assert [items[k]["value"] for k in (2, 4, 6)] == [DEPTH_PROMPT, SEGMENTATION_PROMPT, "<answer>"]
            assert sum(it["need_loss"] == "true" for it in items) == 1
            assert np.array_equal(SEG_CODEC.decode(_img(items[5]["value"])), sample.class_map)
            assert score(q, "<answer>" + last)
            continue
        assert re.fullmatch(r"<think>.*?</think>\s*<answer>.*?\\boxed\{.+?\}.*?</answer>", last, re.S)
        assert score(q, last)  # the trace's boxed answer is the ground truth
        if mode == "text":  # reasoning from the image alone: no map is mentioned as if it had been seen
            assert len(items) == 3 and "map shows" not in last and "depth map places" not in last
            continue
        tools.add(tool)
        for item in items[2:]:  # metres read off a map: to 0.05 m, or two significant figures
            for x in re.findall(r"(\d+(?:\.\d+)?) m\b", item["value"] if item["type"] == "text" else ""):
                assert abs(float(x) * 20 - round(float(x) * 20)) < 1e-6 or len(x.replace(".", "").lstrip("0")) <= 2, x
        if q["category"] == "closer":  # and its reasoning agrees with it
            assert f"so the {q['answer_text']} is nearer" in last
        if tool is None:
            assert len(items) == 3
            continue
        call, image, reflection = items[2], items[3], items[4]
        assert call["need_loss"] == "true" and re.fullmatch(r"<think>.*?</think>\s*<(depth-estimation|segmentation)>.*",
                                                           call["value"], re.S)
        assert call["value"].endswith(DEPTH_PROMPT if tool == "depth" else SEGMENTATION_PROMPT)
        assert image["type"] == "image" and image["need_loss"] == "false"
        assert reflection == {"type": "text", "value": REFLECTION_PROMPT, "need_loss": "false"}
        if tool == "segmentation":  # lossless: the map decodes back to the ground-truth classes
            assert np.array_equal(SEG_CODEC.decode(_img(image["value"])), sample.class_map)
    assert {"depth", "segmentation"} <= tools
    # every traced question has a row in each mode, interleave first
    assert all(m == ["interleave", "perception", "text"] for m in modes.values())


def test_rl_rows_and_stage1_targets(dataset):
    root, _ = dataset
    for r in _rows(root / "RL_data.jsonl"):
        assert set(r) >= {"question", "answer", "image", "data_id", "flag"}
        assert r["flag"] in ("positive", "negative", "boundary")
        assert (r["flag"] == "negative") == (TOOL[r["category"]] is None)
        assert (root / r["image"]).exists()
    for r in _rows(root / "stage1.jsonl"):
        if r["task"] == "depth":
            # The trainer computes the float target from depth_image / depth_scale over depth_range:
            # millimetres, where the old 8-bit target had 3.9 cm levels. No 8-bit target is written.
            assert "depth_target" not in r and not (root / r["depth_image"]).with_name("depth_target.png").exists()
            png = np.asarray(Image.open(root / r["depth_image"]))
            assert png.dtype == np.uint16 and r["depth_scale"] == 1000.0
            target = DepthCodec(*r["depth_range"]).normalize(np.where(png > 0, png / r["depth_scale"], np.nan))
            assert target.dtype == np.float32 and len(np.unique(target[png > 0])) > 256
        else:
            labels = np.asarray(Image.open(root / r["label_image"]))
            assert np.array_equal(SEG_CODEC.decode(np.asarray(Image.open(root / r["seg_image"]))), labels)


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".jsonl", ".json", ".png") and not p.name.endswith("hist.png")
            and p.name != "categories.png"}


def test_deterministic_and_resumable(dataset, tmp_path):
    root, _ = dataset
    # Interrupted run: one scene finished, a half-written scene left behind.
    main(["--out", str(tmp_path), "--num-scenes", "1", "--views-per-scene", "2", "--seed", "5",
          "--width", "64", "--height", "48", "--questions-per-view", "6", "--traces-per-view", "6",
          "--workers", "1"])
    junk = tmp_path / "train" / "scenes" / ".tmp_scene_000001_999"
    junk.mkdir()
    (junk / "sft.jsonl").write_text("half a line")
    generate(str(tmp_path), workers=1, **CFG)
    assert not junk.exists()
    assert _tree(tmp_path / "train") == _tree(root)  # same bytes as the uninterrupted 2-worker run
    # Another split never shares a scene.
    generate(str(tmp_path), workers=1, **dict(CFG, split="val", num_scenes=1))
    a = np.asarray(Image.open(tmp_path / "val" / "scenes" / "scene_000000" / "view_00" / "rgb.png"))
    b = np.asarray(Image.open(root / "scenes" / "scene_000000" / "view_00" / "rgb.png"))
    assert not np.array_equal(a, b)
