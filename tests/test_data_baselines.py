"""Blind baselines stay at chance on every multiple-choice category.

Two small splits (train / test, different scenes) are rendered once; their questions are then
drawn REDRAWS times per view with fresh random streams, 8 per view as `synth` asks them (the ground
truth repeats; the options, forms and picks do not), which multiplies the questions cheaply. A
baseline fails the split when its accuracy on a category is above chance + MARGIN (5 points) with
one-sided significance after Bonferroni over all (baseline, category) cells (64 here), family-wise
alpha 1e-3, using the larger of the binomial and the scene-clustered standard error
(`baselines.excess_z`): a leak-free generator fails it with probability below 0.1%. What it
catches depends on the sample: with ~900-1900 multiple-choice questions per category (distances,
relations, existence) an excess of about 10-12 points over chance is flagged for sure, with the
~130-500 of size, height and counting about 15-23 points (`min_detectable`). The old fixed-ratio
distractors (a ratio picker right 99%) are far beyond that: `test_a_known_leak_is_caught`.
"""

import json
import zlib
from collections import Counter

import numpy as np
import pytest

from training.data import baselines as bl
from training.data.questions import CATEGORIES, LETTERS, make_questions
from training.data.readers import read_synth
from training.data.synth import generate

SCENES, VIEWS, REDRAWS = 36, 4, 8
# 192x144 keeps the pixel threshold of referable objects at the same fraction of the image as at
# the priors' 320x240 (max(40, 0.15%) pixels), so what is asked matches the priors.
SIZE = dict(width=192, height=144)


def _redrawn(split_dir, split):
    questions = []
    for r in range(REDRAWS):
        tallies: dict = {}
        for s in read_synth(split_dir):
            scene = bl.scene_of({"qid": s.sample_id})
            rng = np.random.default_rng([r, zlib.crc32(s.sample_id.encode())])
            for q in make_questions(s, rng, 8, tallies.setdefault(scene, Counter())):
                q["qid"] = q["qid"].replace("_q", f"_r{r}_q")  # scene_of() still finds the scene
                questions.append(q)
    return questions


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("blind")
    for split in ("train", "test"):
        generate(str(out), num_scenes=SCENES, views=VIEWS, seed=11, split=split, questions=8, traces=0,
                 workers=2, progress=False, **SIZE)
    return out


@pytest.fixture(scope="module")
def results(splits):
    train, test = _redrawn(splits / "train", "train"), _redrawn(splits / "test", "test")
    fitted = [b.fit(train) for b in bl.default_baselines()]
    return bl.evaluate(fitted, test), fitted, test


def min_detectable(cell, z):
    """Excess over chance the check flags at this cell's size (binomial SE; the docstring's numbers)."""
    p = cell["chance"] + bl.MARGIN
    return bl.MARGIN + z * np.sqrt(p * (1 - p) / cell["n"])


def test_no_blind_baseline_beats_chance(results):
    res, _, _ = results
    z = bl.critical_z(sum(len(cells) for cells in res["choice"].values()))
    for category in CATEGORIES:  # enough choice questions everywhere for the bound to mean something
        cell = res["choice"]["letter prior"][category]
        bound = 0.25 if category in ("size", "height", "counting") else 0.15
        assert min_detectable(cell, z) <= bound, (category, cell["n"])
    assert bl.leaks(res) == [], bl.markdown(res)


def test_options_are_exchangeable_in_rank(results):
    """The correct value is at a uniformly random rank among numeric options (per option count)."""
    _, _, test = results
    ranks: dict = {}
    for q in test:
        v = bl.option_values(q)
        if v is not None:
            rank = int(np.argsort(np.argsort(v, kind="stable"))[bl.correct_index(q)])
            ranks.setdefault(len(v), Counter())[rank] += 1
    assert {2, 3} <= set(ranks)
    for n, counts in ranks.items():
        total = sum(counts.values())
        if total < 50:
            continue
        expected = total / n  # chi-square with n - 1 dof, far tail only (1e-4)
        chi2 = sum((counts[k] - expected) ** 2 / expected for k in range(n))
        from scipy.stats import chi2 as chi2_dist
        assert chi2_dist.sf(chi2, n - 1) > 1e-4, (n, dict(counts))


def test_a_known_leak_is_caught(results):
    """The old recipe (truth x fixed factors; counts truth +- 1..3) must be flagged."""
    _, fitted, test = results
    rng = np.random.default_rng(0)
    leaky = []
    for q in test:
        v = bl.option_values(q)
        if v is None:
            leaky.append(q)
            continue
        truth = v[bl.correct_index(q)]
        if q["category"] == "counting":
            others = [truth + d for d in rng.permutation([-3, -2, -1, 1, 2, 3]) if truth + d >= 0][:3]
            opts = [str(int(x)) for x in others]
            text = [str(int(truth))]
        else:
            opts = [f"{truth * f:.2f} m" for f in rng.permutation([0.3, 0.55, 1.6, 2.6, 4.0])[:3]]
            text = [f"{truth:.2f} m"]
        slot = int(rng.integers(4))
        options = opts[:slot] + text + opts[slot:]
        leaky.append(dict(q, options=options, answer=LETTERS[slot], answer_text=text[0]))
    train_like = leaky[: len(leaky) // 2]  # fit the learned heuristics on half, score the rest
    refit = [b.fit(train_like) for b in bl.default_baselines() if b.name in ("relative pattern", "nearest mean")]
    flagged = {(f["baseline"], f["category"]) for f in bl.leaks(bl.evaluate(refit, leaky[len(leaky) // 2:]))}
    assert ("relative pattern", "distance_camera") in flagged and ("relative pattern", "counting") in flagged


def test_cli_writes_the_card(splits, capsys):
    bl.main(["--train", str(splits / "train"), "--test", str(splits / "test"), "--card"])
    printed = capsys.readouterr().out
    assert "| bag of words |" in printed and "LEAK" not in printed
    card = json.loads((splits / "test" / "card.json").read_text())
    assert set(card["blind_baselines"]) == {"train", "choice", "numeric"}
    assert "bag of words" in card["blind_baselines"]["choice"]
    md = (splits / "test" / "card.md").read_text()
    assert md.count("## Blind baselines") == 1 and "| class prior |" in md
    bl.main(["--train", str(splits / "train"), "--test", str(splits / "test"), "--card"])  # rewrites, no duplicate
    assert (splits / "test" / "card.md").read_text().count("## Blind baselines") == 1
