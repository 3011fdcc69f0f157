"""The evaluator: metrics on hand-made cases, and one end-to-end run on the sample split."""

from __future__ import annotations

import json

import numpy as np

from training.evaluate import depth_metrics, main, miou


def test_depth_metrics_align_scale_and_shift_before_scoring():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 8.0, (40, 50)).astype(np.float32)
    relative = (gt - 0.3) / 4.0  # an affine image of the truth: perfect after alignment
    aligned = depth_metrics(relative, gt, (1e-3, 10.0), align=True)
    assert aligned["absrel"] < 1e-5 and aligned["delta1"] == 1.0 and aligned["rmse"] < 1e-4
    raw = depth_metrics(relative, gt, (1e-3, 10.0), align=False)
    assert raw["absrel"] > 0.5  # without alignment the same map is far off
    gt_with_holes = gt.copy()
    gt_with_holes[:5] = np.nan  # invalid pixels are ignored, not scored
    assert depth_metrics(relative, gt_with_holes, (1e-3, 10.0), align=True)["absrel"] < 1e-5


def test_miou_over_classes_present():
    confusion = np.array([[8, 2, 0], [0, 10, 0], [0, 0, 0]])  # class 2 absent everywhere
    value, per_class = miou(confusion)
    assert per_class == {0: 0.8, 1: 10 / 12}
    assert abs(value - (0.8 + 10 / 12) / 2) < 1e-12


def test_evaluate_end_to_end_writes_json_markdown_and_plots(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    main(["--checkpoint", str(root / "cooper_model" / "checkpoints" / "cooper-small"),
          "--data", str(root / "training" / "data" / "sample"), "--out", str(tmp_path),
          "--max-images", "2", "--num-steps", "2", "--steps-sweep", "2,3", "--steps-images", "1",
          "--qa-questions", "2", "--qa-given-maps", "--threads", "1"])
    report = json.loads((tmp_path / "report.json").read_text())
    synth = report["datasets"]["synthetic test"]
    assert synth["images"] == 2
    assert set(synth["depth_aligned"]) == {"absrel", "delta1", "rmse"}
    assert 0.0 <= synth["segmentation_miou"] <= 1.0
    assert [r["num_steps"] for r in report["steps"]] == [2, 3, 2, 3]
    # the four modes, and the two that show maps once more with the ground-truth maps
    assert set(report["qa"]["modes"]) == {"direct", "perception", "text", "interleave", "perception+gt", "interleave+gt"}
    assert report["qa"]["modes"]["perception+gt"]["tool_call_rate_per_category"]  # perception always calls both
    answers = [json.loads(line) for line in (tmp_path / "qa_answers.jsonl").read_text().splitlines()]
    n = sum(report["qa"]["modes"]["direct"]["questions_per_category"].values())
    assert len(answers) == 6 * n and {a["mode"] for a in answers} == set(report["qa"]["modes"])
    assert all(a["tools"] == ["depth", "segmentation"] for a in answers if a["mode"] == "perception+gt")
    assert "## Spatial QA accuracy" in (md := (tmp_path / "report.md").read_text()) and "interleave+gt depth" in md
    for name in ("report.md", "steps.png", "examples.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_qa_sample_covers_every_category_and_form_and_reads_the_blind_floor(tmp_path):
    import json

    from training.evaluate import blind_floor, form_group, pick_questions

    qs = ([{"qid": f"a{i}", "category": "closer", "form": "choice"} for i in range(50)]
          + [{"qid": f"b{i}", "category": "counting", "form": "numeric"} for i in range(3)]
          + [{"qid": f"c{i}", "category": "counting", "form": "yesno"} for i in range(5)])
    picked = pick_questions(qs, 9)
    groups = [(q["category"], form_group(q)) for q in picked]
    # a rare group is not crowded out by a common one: 3 / 3 / 3, not the split's 50 : 3 : 5
    assert len(picked) == 9 and len({q["qid"] for q in picked}) == 9
    assert sorted(set(groups)) == [("closer", "choice"), ("counting", "choice"), ("counting", "numeric")]
    assert all(groups.count(g) == 3 for g in set(groups))
    assert pick_questions(qs, 9) == picked  # seeded
    assert len(pick_questions(qs, 1000)) == len(qs)
    card = {"blind_baselines": {"choice": {
        "letter prior": {"closer": {"accuracy": 0.55, "chance": 0.5}},
        "bag of words": {"closer": {"accuracy": 0.52, "chance": 0.5}}},
        "numeric": {"class prior": {"counting": {"accuracy": 0.9}}}}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    floor = blind_floor(tmp_path)
    assert floor["closer"] == {"chance": 0.5, "best_blind_choice": 0.55, "best_blind_choice_name": "letter prior"}
    assert floor["counting"]["best_blind_numeric"] == 0.9
    assert blind_floor(tmp_path / "missing") == {}
