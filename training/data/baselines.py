"""Blind baselines: how much of a split's answers the question text and options give away.

A blind baseline sees what a model that ignores the image sees: the question and its options. Each
one is fitted on a train split (where it learns anything) and scored on a test split, per
category. They are the floor every trained mode must clear, and `tests/test_data_baselines.py`
holds them at chance on the multiple-choice categories.

- options only: `letter prior` (the train split's most common correct letter per option count),
  `longest option`, and on numeric options `nearest mean`, `smallest`, `lower median`,
  `upper median`, `largest`, and `relative pattern` (naive Bayes over the log-ratios, or for
  counts the differences, between an option and the others: it finds any fixed distractor recipe,
  such as "the truth times 0.3, 0.55, 1.6, ...").
- `class prior`: the value an object of the named class typically has. Size and height come from
  the catalogue (the middle of the class's size range, as `scene.typical_extents` builds it);
  distances and counts, which the catalogue does not give, from the train split's median per
  class (distance between objects: per class pair). It picks the option nearest that value and
  answers numeric questions with it.
- `bag of words`: a conditional logit (multinomial logistic regression over a question's options,
  written here in numpy + scipy's L-BFGS, L2 strength picked on a fifth of the train scenes) on
  question words crossed with option tokens (the option's words, its value in ~19% bins, its rank
  among the options, its position). It learns per-class answer priors ("is there a table" -> yes)
  and value priors alike. Being a bag, it does not know which class is named first: a model that
  does answers above/below from world knowledge (small objects rest on furniture; README).

    python -m training.data.baselines --train DIR --test DIR [--card]

`--card` writes the table into the test split's card.md / card.json. Chance is the mean over a
category's questions of 1 / (number of options).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .catalogue import BY_NAME, PLURAL
from .questions import CATEGORIES, LETTERS, is_choice, load_questions, score

VALUE_CATEGORIES = ("distance_camera", "distance_objects", "size", "height", "counting")
MARGIN = 0.05  # a baseline "beats chance" when it is this far above it, significantly (see `leaks`)


# ---- what a blind model can read ------------------------------------------------------------

def options(q: dict) -> list[str]:
    return q["options"] if q["form"] == "choice" else ["yes", "no"]


def correct_index(q: dict) -> int:
    return LETTERS.index(q["answer"]) if q["form"] == "choice" else ["yes", "no"].index(q["answer"])


def chance(q: dict) -> float:
    return 1.0 / len(options(q))


_VALUE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m)?\s*$")


def option_values(q: dict) -> np.ndarray | None:
    """The options as numbers ("2.07 m" -> 2.07, "3" -> 3), or None unless every option is one."""
    if q["form"] != "choice":
        return None
    found = [_VALUE.match(o) for o in q["options"]]
    return np.array([float(m.group(1)) for m in found]) if all(found) else None


def true_value(q: dict) -> float | None:
    """The true value of a numeric-category question, in either form."""
    if q["category"] not in VALUE_CATEGORIES:
        return None
    if q["form"] == "numeric":
        return float(q["answer"])
    return float(_VALUE.match(q["answer_text"]).group(1))


def stem(q: dict) -> str:
    return q["question"].split(" Options:")[0]


_NAMES = sorted({n for c in BY_NAME for n in (c, PLURAL[c])}, key=len, reverse=True)
_MENTION = re.compile(r"\b(" + "|".join(re.escape(n) for n in _NAMES) + r")\b")
_SINGULAR = {PLURAL[c]: c for c in BY_NAME} | {c: c for c in BY_NAME}


def mentioned_classes(q: dict) -> list[str]:
    """Catalogue classes named in the question, in order (read from the text, as a reader would)."""
    return [_SINGULAR[m] for m in _MENTION.findall(stem(q).lower())]


def scene_of(q: dict) -> str:
    """The scene a question belongs to (the unit the splits are drawn in)."""
    return q["qid"].rsplit("_v", 1)[0]


def _log(v):
    return np.log(np.maximum(v, 1e-3))


# ---- baselines ------------------------------------------------------------------------------

class Baseline:
    """`choose(q)` -> option index (or None where it does not apply); `value(q)` -> a numeric
    answer for numeric-form questions (or None)."""

    name = ""

    def fit(self, train: list[dict]) -> "Baseline":
        return self

    def choose(self, q: dict) -> int | None:
        return None

    def value(self, q: dict) -> float | None:
        return None


class LetterPrior(Baseline):
    name = "letter prior"

    def fit(self, train):
        counts: dict = defaultdict(Counter)
        for q in train:
            if is_choice(q):
                counts[(q["form"], len(options(q)))][correct_index(q)] += 1
        self.best = {k: c.most_common(1)[0][0] for k, c in counts.items()}
        return self

    def choose(self, q):
        return self.best.get((q["form"], len(options(q))), 0) if is_choice(q) else None


class LongestOption(Baseline):
    name = "longest option"

    def choose(self, q):
        return int(np.argmax([len(o) for o in q["options"]])) if q["form"] == "choice" else None


class RankPick(Baseline):
    """The option at a fixed rank of the sorted numeric options."""

    def __init__(self, name: str, pick):
        self.name, self.pick = name, pick

    def choose(self, q):
        v = option_values(q)
        return None if v is None else int(np.argsort(v, kind="stable")[self.pick(len(v))])


class NearestMean(Baseline):
    name = "nearest mean"

    def choose(self, q):
        v = option_values(q)
        return None if v is None else int(np.argmin(np.abs(v - v.mean())))


class RelativePattern(Baseline):
    """Naive Bayes over how each option relates to the others (log-ratio for metres, difference
    for counts), learned on the train split: a fixed distractor recipe shows up as a pattern only
    the correct option has."""

    name = "relative pattern"

    @staticmethod
    def _relations(q, v, i):
        if q["category"] == "counting":
            return [f"c{int(round(v[j] - v[i]))}" for j in range(len(v)) if j != i]
        return [f"m{round(math.log(max(v[j], 1e-3) / max(v[i], 1e-3)) / 0.05)}" for j in range(len(v)) if j != i]

    def fit(self, train):
        self.counts = {True: Counter(), False: Counter()}
        for q in train:
            v = option_values(q)
            if v is not None:
                for i in range(len(v)):
                    self.counts[i == correct_index(q)].update(self._relations(q, v, i))
        self.totals = {k: sum(c.values()) for k, c in self.counts.items()}
        self.bins = len(set(self.counts[True]) | set(self.counts[False])) + 1
        return self

    def choose(self, q):
        v = option_values(q)
        if v is None:
            return None

        def log_odds(i):
            return sum(math.log((self.counts[True][r] + 1) / (self.totals[True] + self.bins))
                       - math.log((self.counts[False][r] + 1) / (self.totals[False] + self.bins))
                       for r in self._relations(q, v, i))
        return int(np.argmax([log_odds(i) for i in range(len(v))]))


class ClassPrior(Baseline):
    """Typical value for the named class(es): catalogue sizes, train medians for the rest."""

    name = "class prior"

    def fit(self, train):
        from .scene import typical_extents  # reads the catalogue's meshes; imported only when used

        self.size = {c: float(max(typical_extents(BY_NAME[c]))) for c in BY_NAME}
        self.height = {c: float(typical_extents(BY_NAME[c])[2]) for c in BY_NAME}
        by_key, by_cat = defaultdict(list), defaultdict(list)
        for q in train:
            t = true_value(q)
            if t is not None and q["category"] in ("distance_camera", "distance_objects", "counting"):
                by_key[(q["category"], self._key(q))].append(t)
                by_cat[q["category"]].append(t)
        self.median = {k: float(np.median(v)) for k, v in by_key.items()}
        self.category_median = {k: float(np.median(v)) for k, v in by_cat.items()}
        return self

    @staticmethod
    def _key(q):
        return tuple(sorted(mentioned_classes(q)))

    def value(self, q):
        classes = mentioned_classes(q)
        cat = q["category"]
        if cat in ("size", "height") and classes:
            return (self.size if cat == "size" else self.height)[classes[0]]
        if cat in self.category_median:
            return self.median.get((cat, self._key(q)), self.category_median[cat])
        return None

    def choose(self, q):
        v, prior = option_values(q), self.value(q)
        if v is None or prior is None:
            return None
        return int(np.argmin(np.abs(_log(v) - math.log(max(prior, 1e-3)))))


class BagOfWords(Baseline):
    """Conditional logit over a question's options; features = question word x option token."""

    name = "bag of words"
    L2_GRID = (0.3, 3.0, 30.0)

    @staticmethod
    def _option_tokens(q, i, values):
        n = len(options(q))
        toks = [f"pos{i}/{n}"]
        if values is not None:
            v = values[i]
            toks.append(f"n{int(v)}" if q["category"] == "counting" else f"v{round(math.log2(max(v, 1e-3)) * 4)}")
            toks.append(f"rank{int(np.argsort(np.argsort(values, kind='stable'))[i])}/{n}")
        else:
            toks += [f"o:{w}" for w in re.findall(r"[a-z]+", options(q)[i].lower())]
        return toks

    def _features(self, q):
        cache = getattr(self, "_cache", None)
        if cache is not None and id(q) in cache:
            return cache[id(q)]
        words = {"*"} | set(re.findall(r"[a-z]+", stem(q).lower()))
        values = option_values(q)
        feats = [[f"{w}|{t}" for w in words for t in self._option_tokens(q, i, values)]
                 for i in range(len(options(q)))]
        if cache is not None:
            cache[id(q)] = feats
        return feats

    def _design(self, questions, vocab):
        """Flat arrays: feature index per (option row), row -> question, and each question's answer row."""
        feats, rows, starts, answers = [], [], [], []
        r = 0
        for q in questions:
            starts.append(r)
            answers.append(r + correct_index(q))
            for opt in self._features(q):
                idx = [vocab[f] for f in opt if f in vocab]
                feats += idx
                rows += [r] * len(idx)
                r += 1
        return np.array(feats, np.int64), np.array(rows, np.int64), np.array(starts, np.int64), np.array(answers), r

    @staticmethod
    def _fit_weights(design, n_feat, l2):
        from scipy.optimize import minimize

        feats, rows, starts, answers, n_rows = design
        group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n_rows)))

        def loss(w):
            s = np.bincount(rows, w[feats], minlength=n_rows)
            m = np.maximum.reduceat(s, starts)
            e = np.exp(s - m[group])
            z = np.add.reduceat(e, starts)
            nll = np.sum(np.log(z) + m - s[answers])
            p = e / z[group]
            p[answers] -= 1.0
            grad = np.bincount(feats, p[rows], minlength=n_feat) + l2 * w
            return nll + 0.5 * l2 * w @ w, grad

        return minimize(loss, np.zeros(n_feat), jac=True, method="L-BFGS-B", options={"maxiter": 500}).x

    def fit(self, train):
        train = [q for q in train if is_choice(q)]
        self._cache = {}  # features per question while fitting (the questions outlive the fit)
        scenes = sorted({scene_of(q) for q in train})
        held = set(scenes[::5])  # a fifth of the train scenes picks the L2 strength
        fit_part = [q for q in train if scene_of(q) not in held]
        val_part = [q for q in train if scene_of(q) in held]
        best = (-1.0, self.L2_GRID[0])
        if fit_part and val_part:
            for l2 in self.L2_GRID:
                self._train(fit_part, l2)
                acc = np.mean([self.choose(q) == correct_index(q) for q in val_part])
                best = max(best, (acc, l2), key=lambda t: t[0])
        self.l2 = best[1]
        self._train(train, self.l2)
        self._cache = None
        return self

    def _train(self, questions, l2):
        counts = Counter(f for q in questions for opt in self._features(q) for f in set(opt))
        self.vocab = {f: i for i, f in enumerate(sorted(f for f, c in counts.items() if c >= 2))}
        self.w = self._fit_weights(self._design(questions, self.vocab), len(self.vocab), l2)

    def choose(self, q):
        if not is_choice(q):
            return None
        scores = [sum(self.w[self.vocab[f]] for f in opt if f in self.vocab) for opt in self._features(q)]
        return int(np.argmax(scores))


def default_baselines() -> list[Baseline]:
    return [LetterPrior(), LongestOption(), NearestMean(),
            RankPick("smallest", lambda n: 0), RankPick("lower median", lambda n: (n - 1) // 2),
            RankPick("upper median", lambda n: n // 2), RankPick("largest", lambda n: n - 1),
            RelativePattern(), ClassPrior(), BagOfWords()]


# ---- scoring --------------------------------------------------------------------------------

def evaluate(baselines: list[Baseline], test: list[dict]) -> dict:
    """{baseline: {category: cell}} for the multiple-choice questions (choice and yes/no), and
    {baseline: {category: cell}} under "numeric" for numeric-form answers. A cell holds n, correct,
    accuracy, chance and the per-question record the significance test needs."""
    choice = {b.name: {} for b in baselines}
    numeric = {b.name: {} for b in baselines}
    for category in CATEGORIES:
        qs = [q for q in test if q["category"] == category]
        for b in baselines:
            picks = [(q, b.choose(q)) for q in qs if is_choice(q)]
            picks = [(q, i) for q, i in picks if i is not None]
            if picks:
                hits = [int(i == correct_index(q)) for q, i in picks]
                choice[b.name][category] = _cell(hits, [chance(q) for q, _ in picks], [scene_of(q) for q, _ in picks])
            values = [(q, b.value(q)) for q in qs if q["form"] == "numeric"]
            values = [(q, v) for q, v in values if v is not None]
            if values:
                hits = [int(score(q, f"{v:.2f}" if q["category"] != "counting" else str(int(round(v)))))
                        for q, v in values]
                numeric[b.name][category] = _cell(hits, None, None)
    return {"choice": choice, "numeric": numeric}


def _cell(hits, chances, scenes) -> dict:
    cell = {"n": len(hits), "correct": int(sum(hits)), "accuracy": float(np.mean(hits))}
    if chances is not None:
        cell.update(chance=float(np.mean(chances)), hits=hits, chances=chances, scenes=scenes)
    return cell


def excess_z(cell: dict, margin: float = MARGIN) -> float:
    """One-sided z of "accuracy > chance + margin". The standard error is the larger of the
    binomial one under that null and a cluster-robust one over scenes (questions of one scene are
    not independent), so a leak-free generator fails rarely whatever the split size."""
    hits, chances = np.asarray(cell["hits"], float), np.asarray(cell["chances"])
    n = len(hits)
    resid = hits - chances
    null = np.clip(chances + margin, 0.0, 1.0)
    se_binomial = math.sqrt(float(np.sum(null * (1 - null)))) / n
    by_scene = defaultdict(float)
    for r, s in zip(resid - resid.mean(), cell["scenes"]):
        by_scene[s] += r
    c = len(by_scene)
    se_cluster = math.sqrt(c / max(c - 1, 1) * sum(v * v for v in by_scene.values())) / n
    return float((resid.mean() - margin) / max(se_binomial, se_cluster, 1e-9))


def critical_z(checks: int, family_alpha: float = 1e-3) -> float:
    """One-sided Bonferroni threshold: all `checks` together fail a leak-free split with
    probability at most `family_alpha`."""
    from scipy.stats import norm

    return float(norm.isf(family_alpha / max(checks, 1)))


def leaks(results: dict, margin: float = MARGIN, family_alpha: float = 1e-3) -> list[dict]:
    """(baseline, category) cells whose accuracy is significantly above chance + margin."""
    cells = [(b, c, cell) for b, cats in results["choice"].items() for c, cell in cats.items()]
    z_crit = critical_z(len(cells), family_alpha)
    out = []
    for b, c, cell in cells:
        z = excess_z(cell, margin)
        if z > z_crit:
            out.append({"baseline": b, "category": c, "accuracy": cell["accuracy"], "chance": cell["chance"],
                        "n": cell["n"], "z": z, "z_critical": z_crit})
    return out


def summary(results: dict) -> dict:
    """The results without per-question records (what the card stores)."""
    return {form: {b: {c: {k: v for k, v in cell.items() if k not in ("hits", "chances", "scenes")}
                       for c, cell in cats.items()} for b, cats in table.items()}
            for form, table in results.items()}


def markdown(results: dict) -> str:
    lines = []
    for form, title in (("choice", "multiple choice and yes/no: accuracy (chance)"),
                        ("numeric", "numeric answers: accuracy within the tolerance")):
        table = results[form]
        cats = [c for c in CATEGORIES if any(c in cells for cells in table.values())]
        rows = [(b, cells) for b, cells in table.items() if cells]
        if not cats:
            continue
        lines += [f"#### {title}", "", "| baseline | " + " | ".join(cats) + " |",
                  "|---|" + "---|" * len(cats)]
        if form == "choice":
            n = {c: next(cells[c]["n"] for _, cells in rows if c in cells) for c in cats}
            lines.append("| chance (n) | " + " | ".join(
                f"{next(cells[c]['chance'] for _, cells in rows if c in cells):.2f} ({n[c]})" for c in cats) + " |")
        for b, cells in rows:
            lines.append(f"| {b} | " + " | ".join(f"{cells[c]['accuracy']:.2f}" if c in cells else "" for c in cats) + " |")
        lines.append("")
    return "\n".join(lines)


def write_card(test_dir: Path, train_dir: Path, results: dict) -> None:
    """Add the table to the test split's card (the dataset card written by `synth`)."""
    card_json = test_dir / "card.json"
    card = json.loads(card_json.read_text()) if card_json.exists() else {}
    card["blind_baselines"] = {"train": str(train_dir), **summary(results)}
    card_json.write_text(json.dumps(card, indent=1))
    md = test_dir / "card.md"
    text = md.read_text().split("\n## Blind baselines")[0] if md.exists() else ""
    md.write_text(text.rstrip("\n") + f"\n\n## Blind baselines\n\nFitted on `{train_dir}`, scored here "
                  "(`python -m training.data.baselines`; see its docstring for each baseline).\n\n"
                  + markdown(results))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="split the fitted baselines learn from")
    ap.add_argument("--test", required=True, help="split they are scored on")
    ap.add_argument("--card", action="store_true", help="write the table into the test split's card")
    ap.add_argument("--json", default=None, help="also write the results (without per-question records) here")
    a = ap.parse_args(argv)
    train, test = load_questions(a.train), load_questions(a.test)
    results = evaluate([b.fit(train) for b in default_baselines()], test)
    print(markdown(results))
    for leak in leaks(results):
        print(f"LEAK: {leak['baseline']} on {leak['category']}: {leak['accuracy']:.3f} vs chance "
              f"{leak['chance']:.3f} (n={leak['n']}, z={leak['z']:.1f} > {leak['z_critical']:.1f})")
    if a.json:
        Path(a.json).write_text(json.dumps(summary(results), indent=1))
    if a.card:
        write_card(Path(a.test), Path(a.train), results)


if __name__ == "__main__":
    main()
