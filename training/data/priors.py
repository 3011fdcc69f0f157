"""The generator's own answer priors, which questions draw distractors and choices from.

A multiple-choice question gives nothing away when its options are exchangeable given what the
text says: if the correct value and the distractors come from one distribution (that of the
truth, given the category and the classes the question names), no function of the text and
options can tell which is which. `questions.py` therefore draws distractors from these priors,
and picks closer / in-front pairs and existence classes so that a class name does not predict the
answer. They are measured on a reference split, over the candidates the question maker would ask
about in each view, each view weighted by how often `make` asks the category there:

- `values`: per category (distance_camera, distance_objects, size, height) and key (the object's
  class, or the sorted pair of classes), quantiles of log(value);
- `counts`: per class, the distribution of counting answers;
- `existence`: per class c, a score g: a view asks about c with weight exp(g[c]) when c is
  present ("yes") and exp(-g[c]) when it is absent ("no");
- `nearness`: per category (closer, front_behind) and class, a score g: a view picks its candidate
  pair (nearer x, farther y) with weight exp(g[y] - g[x]).
Both weights are calibrated (`_calibrate`) so that, picking one candidate per view with them, every
class is the answer "yes" as often as "no", and the nearer object as often as the farther one.

A key with fewer than MIN_SAMPLES candidates falls back to the category as a whole ("*").

    python -m training.data.synth --out runs/priors --num-scenes 2400 --views-per-scene 3 --seed 0 --split priors --traces-per-view 0
    python -m training.data.priors --data runs/priors/priors --out training/data/priors.json

(The reference split takes 10-50 minutes on 2 cores, depending on load; the build about 3.)
Rebuild them whenever the scene generator or the question definitions change what is asked;
`tests/test_data_baselines.py` fails when stale priors let a blind baseline beat chance.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

DEFAULT_PATH = Path(__file__).with_name("priors.json")
VALUE_CATEGORIES = ("distance_camera", "distance_objects", "size", "height")
NEARNESS_CATEGORIES = ("closer", "front_behind")
# Cumulative probabilities of the stored quantiles: the minimum, 39 normal-spaced points from
# 0.13% to 99.87%, the maximum. Dense tails keep draws from spreading a quantile bin's mass evenly
# down to an outlying minimum (with 33 even quantiles, too many draws fell below the truths).
GRID = np.concatenate([[0.0], [0.5 * (1 + math.erf(z / math.sqrt(2))) for z in np.linspace(-3, 3, 39)], [1.0]])
MIN_SAMPLES = 30


class Priors:
    def __init__(self, table: dict):
        self.table = table
        self.values = {c: {k: np.asarray(q) for k, q in keys.items()} for c, keys in table.get("values", {}).items()}
        self.counts = table.get("counts", {})
        self.existence = table.get("existence", {})
        self.nearness = table.get("nearness", {})

    @staticmethod
    def key(classes) -> str:
        return "|".join(sorted(classes))

    def sample_values(self, category: str, classes, n: int, rng: np.random.Generator) -> np.ndarray | None:
        """n draws of the category's value given the classes (None without a prior)."""
        keys = self.values.get(category, {})
        q = keys.get(self.key(classes), keys.get("*"))
        if q is None:
            return None
        return np.exp(np.interp(rng.random(n), GRID, q))

    def sample_counts(self, class_name: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
        pmf = self.counts.get(class_name, self.counts.get("*"))
        if pmf is None:
            return None
        values = np.array([int(k) for k in pmf])
        return rng.choice(values, size=n, p=np.array(list(pmf.values())) / sum(pmf.values()))


@functools.lru_cache(maxsize=None)
def default_priors() -> Priors:
    if not DEFAULT_PATH.exists():
        raise FileNotFoundError(f"{DEFAULT_PATH} is missing; build it as the priors module docstring says")
    return Priors(json.loads(DEFAULT_PATH.read_text()))


NO_PRIORS = Priors({})  # what the builder asks with: candidates only, no distractors


# ---- building ---------------------------------------------------------------------------------

def _weighted_quantiles(values, weights) -> list[float]:
    keep = np.asarray(weights) > 0
    order = np.argsort(np.asarray(values)[keep])
    v, w = np.log(np.asarray(values)[keep][order]), np.asarray(weights)[keep][order]
    cdf = (np.cumsum(w) - w / 2) / w.sum()
    return np.round(np.interp(GRID, cdf, v), 3).tolist()


def _calibrate(views, view_weights, classes, steps: int = 200) -> dict[str, float]:
    """Log-weights g per label such that, when each view picks one of its candidates with
    probability proportional to exp(sum of its labels' signed g) (and counts `view_weights` times),
    every class is on each side equally often. A view is a list of candidates, each a list of (class, sign) with sign +1 for
    the side that should not dominate ("yes", nearer) and -1 for the other. Plain fixed-point
    steps on the log-ratio of each class's two sides."""
    index = {c: i for i, c in enumerate(classes)}
    flat = [(v, k, index[c], sign) for v, cands in enumerate(views) for k, cand in enumerate(cands)
            for c, sign in cand]
    view, cand, cls, sign = (np.array(x) for x in zip(*flat))
    key = np.unique(view * 10_000 + cand, return_inverse=True)[1]  # candidate id
    cand_view = np.zeros(key.max() + 1, np.int64)
    cand_view[key] = view
    vw = np.asarray(view_weights, float)
    g = np.zeros(len(classes))
    for _ in range(steps):
        logit = np.bincount(key, sign * g[cls])
        w = np.exp(logit - logit.max())
        p = w / np.bincount(cand_view, w)[cand_view] * vw[cand_view]  # each view picks one candidate
        plus = np.bincount(cls, p[key] * (sign > 0), len(classes)) + 1e-9
        minus = np.bincount(cls, p[key] * (sign < 0), len(classes)) + 1e-9
        g -= 0.5 * np.log(plus / minus)
    return {c: round(float(v), 4) for c, v in zip(classes, g)}


def _classes(views) -> list[str]:
    return sorted({c for cands in views for cand in cands for c, _ in cand})


def _ask_rates(scene_samples, redraws: int, questions: int) -> list[Counter]:
    """How often `make` asks each category in each view of a scene (per draw, over `redraws`
    draws with the scene's shared tally, as `synth` asks them). Views differ: one with few
    objects has few pair questions, so its objects get more of the single-object ones."""
    from .questions import QuestionMaker

    rates = [Counter() for _ in scene_samples]
    for r in range(redraws):
        tally: Counter = Counter()
        rng = np.random.default_rng([r, zlib.crc32(scene_samples[0].sample_id.encode())])
        for rate, sample in zip(rates, scene_samples):
            for q in QuestionMaker(sample, rng, tally=tally, priors=NO_PRIORS).make(questions):
                rate[q["category"]] += 1 / redraws
    return rates


def build(split_dir: str | Path, redraws: int = 4, questions: int = 8) -> dict:
    """Measure the priors on a split written by `training.data.synth` (its samples, not its
    questions): every candidate of a view weighs as much as the view's share of that category's
    questions (`_ask_rates`, for `questions` per view, synth's default)."""
    from itertools import groupby

    from tqdm import tqdm

    from .questions import QuestionMaker, object_value, pair_value
    from .readers import read_synth

    values = defaultdict(lambda: defaultdict(lambda: ([], [])))
    counts = defaultdict(lambda: defaultdict(float))
    existence_views, existence_weights = [], []
    nearness_views, nearness_weights = defaultdict(list), defaultdict(list)
    views = 0
    samples = tqdm(read_synth(split_dir), desc="priors", unit="view")
    for _, group in groupby(samples, key=lambda s: s.sample_id.rsplit("_v", 1)[0]):
        scene_samples = list(group)
        for sample, rate in zip(scene_samples, _ask_rates(scene_samples, redraws, questions)):
            views += 1
            qm = QuestionMaker(sample, np.random.default_rng(0), priors=NO_PRIORS)
            for category in ("distance_camera", "size", "height"):
                for o in qm.objs:
                    for key in (o.class_name, "*"):
                        vs, ws = values[category][key]
                        vs.append(object_value(category, o))
                        ws.append(rate[category] / len(qm.objs))
            pairs = qm.object_pairs()
            for a, b in pairs:
                for key in (Priors.key([a.class_name, b.class_name]), "*"):
                    vs, ws = values["distance_objects"][key]
                    vs.append(pair_value(a, b))
                    ws.append(rate["distance_objects"] / len(pairs))
            class_counts = qm.class_counts()
            for c, p in qm.counting_weights(class_counts).items():
                counts[c][class_counts[c]] += p * rate["counting"]
                counts["*"][class_counts[c]] += p * rate["counting"]
            status = qm.existence_status()
            if status and rate["existence"]:  # a "yes" candidate weighs exp(g[c]), a "no" exp(-g[c])
                existence_views.append([[(c, 1 if present else -1)] for c, present in status.items()])
                existence_weights.append(rate["existence"])
            for category in NEARNESS_CATEGORIES:
                ordered = qm.ordered_pairs(category)
                if ordered and rate[category]:  # (nearer, farther) weighs exp(g[farther] - g[nearer])
                    nearness_views[category].append([[(n.class_name, -1), (f.class_name, 1)] for n, f in ordered])
                    nearness_weights[category].append(rate[category])
    table = {"reference": {"split": str(split_dir), "views": views, "redraws": redraws,
                           "questions_per_view": questions, "min_samples": MIN_SAMPLES,
                           "quantile_grid": "min, Phi(linspace(-3, 3, 39)), max"},
             "values": {c: {k: _weighted_quantiles(vs, ws) for k, (vs, ws) in sorted(keys.items())
                            if sum(w > 0 for w in ws) >= MIN_SAMPLES}
                        for c, keys in sorted(values.items())},
             "counts": {c: {str(k): round(v / sum(pmf.values()), 4) for k, v in sorted(pmf.items()) if v > 0}
                        for c, pmf in sorted(counts.items()) if sum(pmf.values()) > 0},
             "existence": _calibrate(existence_views, existence_weights, _classes(existence_views)),
             "nearness": {c: _calibrate(nearness_views[c], nearness_weights[c], _classes(nearness_views[c]))
                          for c in NEARNESS_CATEGORIES if nearness_views[c]}}
    return table


def to_json(table: dict) -> str:
    """Indented JSON with each list of numbers on one line (a readable, diffable file)."""
    text = json.dumps(table, indent=1)
    return re.sub(r"\[\s*([-0-9.,\s]+?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                  text) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a split written by python -m training.data.synth")
    ap.add_argument("--out", default=str(DEFAULT_PATH))
    a = ap.parse_args(argv)
    table = build(a.data)
    Path(a.out).write_text(to_json(table))
    print(f"{a.out}: {table['reference']['views']} views, "
          + ", ".join(f"{c}: {len(k)} keys" for c, k in table["values"].items()))


if __name__ == "__main__":
    main()
