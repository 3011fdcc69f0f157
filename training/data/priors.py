"""The generator's own answer priors, which questions draw distractors and choices from.

A multiple-choice question gives nothing away when its options are exchangeable given what the
text says: if the correct value and the distractors come from one distribution (that of the
truth, given the category and the classes the question names), no function of the text and
options can tell which is which. `questions.py` therefore draws distractors from these priors,
and picks closer / in-front pairs and existence classes so that a class name does not predict the
answer. They are measured on a reference split, over the candidates the question maker would ask
about in each view, each view weighted equally:

- `values`: per category (distance_camera, distance_objects, size, height) and key (the object's
  class, or the sorted pair of classes), quantiles of log(value);
- `counts`: per class, the distribution of counting answers;
- `presence`: per class, how often an existence question about it would be a "yes";
- `nearness`: per category (closer, front_behind), Bradley-Terry scores: logit P(an object of
  class x is nearer than one of class y) = s[x] - s[y].

A key with fewer than MIN_SAMPLES candidates falls back to the category as a whole ("*").

    python -m training.data.synth --out runs/priors --num-scenes 800 --views-per-scene 3 --seed 0 --split priors --traces-per-view 0
    python -m training.data.priors --data runs/priors/priors --out training/data/priors.json

Rebuild them whenever the scene generator or the question definitions change what is asked;
`tests/test_data_baselines.py` fails when stale priors let a blind baseline beat chance.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

DEFAULT_PATH = Path(__file__).with_name("priors.json")
VALUE_CATEGORIES = ("distance_camera", "distance_objects", "size", "height")
NEARNESS_CATEGORIES = ("closer", "front_behind")
QUANTILES = 33
MIN_SAMPLES = 30


class Priors:
    def __init__(self, table: dict):
        self.table = table
        self.values = {c: {k: np.asarray(q) for k, q in keys.items()} for c, keys in table.get("values", {}).items()}
        self.counts = table.get("counts", {})
        self.presence = table.get("presence", {})
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
        return np.exp(np.interp(rng.random(n), np.linspace(0, 1, len(q)), q))

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
    order = np.argsort(values)
    v, w = np.log(np.asarray(values)[order]), np.asarray(weights)[order]
    cdf = (np.cumsum(w) - w / 2) / w.sum()
    return np.round(np.interp(np.linspace(0, 1, QUANTILES), cdf, v), 3).tolist()


def _bradley_terry(pairs, weights) -> dict[str, float]:
    """Scores s with logit P(x nearer than y) = s[x] - s[y], from (nearer, farther) class pairs."""
    from scipy.optimize import minimize

    classes = sorted({c for p in pairs for c in p})
    index = {c: i for i, c in enumerate(classes)}
    near = np.array([index[a] for a, _ in pairs])
    far = np.array([index[b] for _, b in pairs])
    w = np.asarray(weights, float)

    def loss(s):
        d = s[near] - s[far]
        p = 1 / (1 + np.exp(-d))
        g = np.bincount(near, w * (p - 1), len(classes)) - np.bincount(far, w * (p - 1), len(classes))
        return float(np.sum(w * np.logaddexp(0, -d)) + 0.5 * s @ s), g + s  # unit Gaussian prior on s

    s = minimize(loss, np.zeros(len(classes)), jac=True, method="L-BFGS-B").x
    return {c: round(float(v - s.mean()), 4) for c, v in zip(classes, s)}


def build(split_dir: str | Path) -> dict:
    """Measure the priors on a split written by `training.data.synth` (its samples, not its questions)."""
    from tqdm import tqdm

    from .questions import QuestionMaker, object_value, pair_value
    from .readers import read_synth

    values = defaultdict(lambda: defaultdict(lambda: ([], [])))
    counts = defaultdict(lambda: defaultdict(float))
    presence = defaultdict(lambda: [0.0, 0.0])
    nearness = defaultdict(lambda: ([], []))
    views = 0
    for sample in tqdm(read_synth(split_dir), desc="priors", unit="view"):
        views += 1
        qm = QuestionMaker(sample, np.random.default_rng(0), priors=NO_PRIORS)
        for category in ("distance_camera", "size", "height"):
            for o in qm.objs:
                for key in (o.class_name, "*"):
                    vs, ws = values[category][key]
                    vs.append(object_value(category, o))
                    ws.append(1 / len(qm.objs))
        pairs = qm.object_pairs()
        for a, b in pairs:
            for key in (Priors.key([a.class_name, b.class_name]), "*"):
                vs, ws = values["distance_objects"][key]
                vs.append(pair_value(a, b))
                ws.append(1 / len(pairs))
        class_counts = qm.class_counts()
        for c, p in qm.counting_weights(class_counts).items():
            counts[c][class_counts[c]] += p
            counts["*"][class_counts[c]] += p
        for c, present in qm.existence_status().items():
            presence[c][0 if present else 1] += 1
        for category in NEARNESS_CATEGORIES:
            ordered = qm.ordered_pairs(category)
            for n, f in ordered:
                if n.class_name != f.class_name:
                    nearness[category][0].append((n.class_name, f.class_name))
                    nearness[category][1].append(1 / len(ordered))
    table = {"reference": {"split": str(split_dir), "views": views, "quantiles": QUANTILES,
                           "min_samples": MIN_SAMPLES},
             "values": {c: {k: _weighted_quantiles(vs, ws) for k, (vs, ws) in sorted(keys.items())
                            if len(vs) >= MIN_SAMPLES}
                        for c, keys in sorted(values.items())},
             "counts": {c: {str(k): round(v / sum(pmf.values()), 4) for k, v in sorted(pmf.items())}
                        for c, pmf in sorted(counts.items()) if sum(pmf.values()) > 0},
             "presence": {c: round(yes / (yes + no), 4) for c, (yes, no) in sorted(presence.items())},
             "nearness": {c: _bradley_terry(*nearness[c]) for c in NEARNESS_CATEGORIES if nearness[c][0]}}
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
