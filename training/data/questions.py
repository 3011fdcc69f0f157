"""Spatial questions whose answers are computed from a sample's ground truth, and their scoring.

Definitions (these are what the answers mean, and what the evaluator checks):
- distance_camera: Euclidean distance from the camera centre to the object's 3-D box centre (m).
- distance_objects: distance between the two objects' 3-D box centres (m).
- size: the longest side of the object's 3-D box (m).
- height: the object's vertical extent along gravity (m).
- left_right: camera frame x; asked only when the two boxes do not overlap in x and the image
  columns of their centres agree.
- above_below: along gravity (world z through the recorded pose, so camera pitch and roll do not
  matter); asked only when the boxes are separated vertically by >= 2 cm, or when one rests on
  the other: its bottom within `CONTACT_M` (the physics contact tolerance) of the other's top and
  its centre over the other's top face (the mug on the table is above the table).
- front_behind: camera frame z (depth); asked only when the boxes do not overlap in depth.
- closer: which box centre is nearer the camera; asked only when the distances differ by >= 15%.
- counting / existence: instances of a class with >= `min_pixels` visible pixels; a class with a
  barely visible instance (0 < pixels < min_pixels) is never asked about, so answers are unambiguous.
Balance: `make` picks, slot by slot, the category asked least so far in the scene (`tally`,
shared by a scene's views; views where a category was unanswerable count in its favour, and pair
relations win ties, being only sometimes answerable), at most
`MAX_PER_VIEW` per category per view (counting once), never repeating a category's object(s) within a view. The
relation words go to whichever is behind in the tally; choice options are shuffled, with the
correct one on the letter least used so far by questions with as many options (ties at random), so
the letters are uniform over a question's options (two-option questions: A or B).
Blindness: nothing in the text and options alone predicts the answer (`baselines.py` measures it).
Numeric distractors are drawn from the prior of the truth given the classes named
(`priors.py`), so the options are exchangeable and the truth is at a uniformly random rank
(`_exchangeable_options`); closer / front_behind pairs and existence classes are picked with
calibrated weights that make each class's answers even. Numeric-category rows record the true
`value` in either form.
Numeric answers are scored correct within a relative error of `RELATIVE_TOLERANCE` (25%, the
usual "within a factor" band for metric estimates from one image); counts must be exact. Each
question records its tolerance.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from .catalogue import PLURAL
from .geometry import box_corners, project
from .priors import Priors, default_priors
from .schema import ObjectAnnotation, Sample

RELATIVE_TOLERANCE = 0.25
CATEGORIES = ("distance_camera", "distance_objects", "size", "height", "left_right", "above_below",
              "front_behind", "closer", "counting", "existence")
# Which auxiliary modality decides each category (None: answerable from the image alone).
TOOL = {"distance_camera": "depth", "distance_objects": "depth", "closer": "depth",
        "front_behind": "depth", "size": "depth", "height": "depth",
        "counting": "segmentation", "existence": "segmentation",
        "left_right": None, "above_below": None}
LETTERS = "ABCD"
MAX_PER_VIEW = 2
# These pick their class or pair by weight (counting_weights, the priors' calibrated weights), so a
# second pick in a view, made without the first, would follow another distribution than the one
# the priors describe.
ONCE_PER_VIEW = ("counting", "existence", "closer", "front_behind")
SEPARATION_M = 0.02  # gap between boxes along a relation's axis
CONTACT_M = 0.01  # resting contact: the physics penetration bound of the scene tests
PAIR_FIRST = ("above_below", "front_behind", "left_right", "closer", "distance_objects")

PHRASES = {
    "distance_camera": ["How far is the {a} from the camera?",
                        "What is the distance between the camera and the {a}?",
                        "Estimate how far away the {a} is from the viewer."],
    "distance_objects": ["How far is the {a} from the {b}?",
                         "What is the distance between the {a} and the {b}?",
                         "Estimate the distance from the {a} to the {b}."],
    "size": ["How long is the longest side of the {a}?",
             "What is the largest dimension of the {a}?",
             "Estimate the size of the {a} along its longest side."],
    "height": ["How tall is the {a}?",
               "What is the height of the {a}?",
               "Estimate the vertical height of the {a}."],
    "left_right": ["Is the {a} to the left or to the right of the {b}?",
                   "From the camera's viewpoint, is the {a} left or right of the {b}?",
                   "Which side of the {b} is the {a} on, left or right?"],
    "above_below": ["Is the {a} above or below the {b}?",
                    "Is the {a} higher or lower than the {b}?",
                    "Considering height, is the {a} above or below the {b}?"],
    "front_behind": ["Is the {a} in front of or behind the {b}?",
                     "Relative to the camera, is the {a} in front of or behind the {b}?",
                     "Is the {a} nearer or farther than the {b} from the camera?"],
    "closer": ["Which is closer to the camera, the {a} or the {b}?",
               "Which object is nearer to the viewer: the {a} or the {b}?",
               "Between the {a} and the {b}, which one is closer to the camera?"],
    "counting": ["How many {p} are there in the image?",
                 "Count the {p} in the image.",
                 "What is the number of {p} visible in this picture?"],
    "existence": ["Is there a {c} in the image?",
                  "Does the image contain a {c}?",
                  "Can you see a {c} in this picture?"],
}
# Option words per relation category; the first is the "positive" relation.
RELATION_WORDS = {"left_right": ("left", "right"), "above_below": ("above", "below"),
                  "front_behind": ("in front", "behind")}
UNIT_SUFFIX = " Answer in metres."
DRAWS = 5  # prior draws a multiple-choice question starts from, beside the truth
# Options of a numeric choice at least this far apart (ratio), so that a value within the numeric
# tolerance of one option is far from the others.
OPTION_RATIO = 1 + 1.5 * RELATIVE_TOLERANCE


def object_value(category: str, o: ObjectAnnotation) -> float:
    """The answer of a single-object numeric question (definitions at the top of this module)."""
    if category == "distance_camera":
        return float(np.linalg.norm(o.centre))
    return float(max(o.size)) if category == "size" else float(o.height)


def pair_value(a: ObjectAnnotation, b: ObjectAnnotation) -> float:
    return float(np.linalg.norm(np.subtract(a.centre, b.centre)))


class QuestionMaker:
    """Draws balanced questions for one sample from its ground truth.

    `tally` counts the questions already drawn per category and per category answer; pass the same
    Counter for every view of a scene so that the scene's questions are balanced as a whole."""

    def __init__(self, sample: Sample, rng: np.random.Generator, min_pixels: int | None = None,
                 tally: Counter | None = None, priors: Priors | None = None):
        self.s, self.rng = sample, rng
        self.priors = priors if priors is not None else default_priors()
        self.tally = tally if tally is not None else Counter()
        h, w = sample.rgb.shape[:2]
        self.min_pixels = min_pixels if min_pixels is not None else max(40, int(0.0015 * h * w))
        seen = [o for o in sample.objects if o.pixels > 0]
        labels = [o.label for o in seen]
        # Referable objects: clearly visible, in front of the camera, with a unique description.
        self.objs = [o for o in seen if o.pixels >= self.min_pixels and o.centre[2] > 0
                     and labels.count(o.label) == 1]
        self.classes_ambiguous = {o.class_name for o in sample.objects if 0 < o.pixels < self.min_pixels}
        self.up_cam = self._up_in_camera()
        self.used: set = set()  # (category, objects, class) already asked in this view
        self._corner_cache: dict[int, np.ndarray] = {}

    def _up_in_camera(self) -> np.ndarray:
        if self.s.cam_to_world is None:
            return np.array([0.0, -1.0, 0.0])  # no pose: assume a level camera
        return np.asarray(self.s.cam_to_world)[2, :3]  # world z expressed in the camera frame

    # ---- helpers -------------------------------------------------------------------------------
    def _pick(self, seq):
        return seq[self.rng.integers(len(seq))]

    def _phrase(self, category, **kw):
        return self._pick(PHRASES[category]).format(**kw)

    def _corners(self, o: ObjectAnnotation) -> np.ndarray:
        if o.instance_id not in self._corner_cache:
            self._corner_cache[o.instance_id] = box_corners(np.array(o.centre), np.array(o.size),
                                                            np.array(o.rotation))
        return self._corner_cache[o.instance_id]

    @staticmethod
    def _key(category, objects=(), class_name=None):
        return category, frozenset(objects), class_name

    def _fresh(self, category, objects=(), class_name=None) -> bool:
        return self._key(category, objects, class_name) not in self.used

    def _lagging(self, category, answers):
        """Index of the answer given least so far in the tally (ties drawn at random)."""
        counts = [self.tally[f"{category}:{a}"] for a in answers]
        best = [i for i, c in enumerate(counts) if c == min(counts)]
        return best[0] if len(best) == 1 else int(self._pick(best))

    def _single(self, category):
        objs = [o for o in self.objs if self._fresh(category, [o.instance_id])]
        return self._pick(objs) if objs else None

    def _numeric(self, category, text, value, objects, classes):
        """Multiple choice where the prior yields options (one try, see below), else numeric."""
        q = {"category": category, "objects": objects, "tool": TOOL[category], "value": round(float(value), 4)}
        value = round(float(value), 2)
        options = self._exchangeable_options(category, classes, value)
        if options is None:
            q.update(form="numeric", question=text + UNIT_SUFFIX, answer=value, unit="m",
                     tolerance={"relative": RELATIVE_TOLERANCE})
            return q
        return self._choice(q, text, [f"{v:.2f} m" for v in options], 0)

    def _exchangeable_options(self, category, classes, truth, count=False):
        """The truth and distractors drawn from the same prior, or None (ask it numerically).

        DRAWS values come from the prior of the truth given what the text names; with the truth
        they are exchangeable. An options set is chosen from all of them by a rule blind to which
        one is the truth (sorted, ties in random order, each kept if OPTION_RATIO above the last
        kept, or for counts above it at all; then at most four at random), and the question is
        multiple choice only if the truth was chosen. Given the options, every one is then equally
        likely to be the truth, whatever one knows about objects of those classes."""
        draws = (self.priors.sample_counts(classes[0], DRAWS, self.rng) if count
                 else self.priors.sample_values(category, classes, DRAWS, self.rng))
        if draws is None:
            return None
        values = np.concatenate([[truth], np.round(draws, 0 if count else 2)])
        order = self.rng.permutation(len(values))
        order = order[np.argsort(values[order], kind="stable")]
        kept = [order[0]]
        for i in order[1:]:
            if (values[i] >= values[kept[-1]] + 1) if count else (values[i] >= values[kept[-1]] * OPTION_RATIO):
                kept.append(i)
        if len(kept) > len(LETTERS):
            kept = list(self.rng.choice(kept, len(LETTERS), replace=False))
        if 0 not in kept or len(kept) < 2:
            return None
        # Truth first, as _choice expects; the distractors' order and the letters are random there.
        return [truth] + [values[i].item() for i in kept if i != 0]

    def _choice(self, q, text, options, correct_index):
        """Options shuffled so that the correct one lands on the letter that questions with this
        many options have used least in the tally; ties and the distractors' order are random."""
        letters = LETTERS[:len(options)]
        slot = self._lagging(f"letters{len(options)}", letters)
        self.tally[f"letters{len(options)}:{letters[slot]}"] += 1
        rest = [options[i] for i in self.rng.permutation(len(options)) if i != correct_index]
        options = rest[:slot] + [options[correct_index]] + rest[slot:]
        letter = letters[slot]
        listing = " ".join(f"({LETTERS[i]}) {opt}" for i, opt in enumerate(options))
        q.update(form="choice", question=f"{text} Options: {listing}", options=options, answer=letter,
                 answer_text=options[LETTERS.index(letter)], tolerance={"exact": True})
        return q

    def object_pairs(self):
        """Unordered pairs of referable objects (the candidates of distance_objects)."""
        return [(a, b) for i, a in enumerate(self.objs) for b in self.objs[i + 1:]]

    def _pair(self, category, accept):
        pairs = [(a, b) for a in self.objs for b in self.objs
                 if a is not b and self._fresh(category, [a.instance_id, b.instance_id]) and accept(a, b)]
        return self._pick(pairs) if pairs else None

    # ---- categories ----------------------------------------------------------------------------
    def _single_numeric(self, category):
        o = self._single(category)
        if o is None:
            return None
        return self._numeric(category, self._phrase(category, a=o.label), object_value(category, o),
                             [o.instance_id], [o.class_name])

    def distance_camera(self):
        return self._single_numeric("distance_camera")

    def size(self):
        return self._single_numeric("size")

    def height(self):
        return self._single_numeric("height")

    def distance_objects(self):
        pairs = [(a, b) for a, b in self.object_pairs() if self._fresh("distance_objects", [a.instance_id, b.instance_id])]
        if not pairs:
            return None
        a, b = pairs[self.rng.integers(len(pairs))]
        if self.rng.random() < 0.5:
            a, b = b, a
        return self._numeric("distance_objects", self._phrase("distance_objects", a=a.label, b=b.label),
                             pair_value(a, b), [a.instance_id, b.instance_id], [a.class_name, b.class_name])

    def _separated(self, coord, a, b) -> bool:
        """a's box lies entirely before b's along `coord(corners)`, with a clear gap."""
        return coord(self._corners(a)).max() < coord(self._corners(b)).min() - SEPARATION_M

    def _before(self, category):
        """The relation of a category as before(a, b) (positive word = a before b)."""
        if category == "left_right":
            def left_of(a, b):
                ua, ub = project(np.array([a.centre, b.centre]), self.s.intrinsics)[:, 0]
                return ua < ub and self._separated(lambda c: c[:, 0], a, b)
            return left_of
        if category == "above_below":
            return lambda a, b: self._separated(lambda c: -(c @ self.up_cam), a, b) or self._rests_on(a, b)
        return lambda a, b: self._separated(lambda c: c[:, 2], a, b)  # front_behind: a nearer

    def ordered_pairs(self, category, fresh=False):
        """Candidate pairs of a nearness category as (nearer, farther): front_behind = separated
        in depth, closer = centre distances differing by >= 15%."""
        out = []
        for a, b in self.object_pairs():
            if fresh and not self._fresh(category, [a.instance_id, b.instance_id]):
                continue
            if category == "closer":
                da, db = np.linalg.norm(a.centre), np.linalg.norm(b.centre)
                if da * 1.15 < db or db * 1.15 < da:
                    out.append((a, b) if da < db else (b, a))
            else:
                before = self._before(category)
                if before(a, b) or before(b, a):
                    out.append((a, b) if before(a, b) else (b, a))
        return out

    def _class_balanced(self, category, pairs):
        """One (nearer, farther) pair, picked with weight exp(g[farther] - g[nearer]) under the
        prior's calibrated scores, so that over a split each class is the nearer one as often as
        the farther one (cameras aim at small objects on furniture, which would otherwise make
        "the mug" the likely answer)."""
        if not pairs:
            return None
        g = self.priors.nearness.get(category, {})
        w = np.exp([g.get(f.class_name, 0.0) - g.get(n.class_name, 0.0) for n, f in pairs])
        return pairs[self.rng.choice(len(pairs), p=w / w.sum())]

    def _relation(self, category):
        """A question about a pair with before(a, b) true; positive = a before b."""
        if category == "front_behind":
            pair = self._class_balanced(category, self.ordered_pairs(category, fresh=True))
        else:
            before = self._before(category)
            pair = self._pair(category, lambda a, b: before(a, b))
        if pair is None:
            return None
        a, b = pair
        # Ask it whichever way round gives the answer word this scene has used least.
        correct = self._lagging(category, RELATION_WORDS[category])
        if correct == 1:
            a, b = b, a
        q = {"category": category, "objects": [a.instance_id, b.instance_id], "tool": TOOL[category]}
        return self._choice(q, self._phrase(category, a=a.label, b=b.label),
                            list(RELATION_WORDS[category]), correct)

    def left_right(self):
        return self._relation("left_right")

    def _heights(self, o: ObjectAnnotation) -> np.ndarray:
        return self._corners(o) @ self.up_cam  # heights along gravity, up to a common offset

    def _rests_on(self, a: ObjectAnnotation, b: ObjectAnnotation) -> bool:
        """a sits on b's top face: a's bottom within CONTACT_M of b's top (touching, not
        overlapping beyond the contact tolerance) and a's centre over b's upright top face."""
        bottom_a, top_b = self._heights(a).min(), self._heights(b).max()
        if not top_b - CONTACT_M <= bottom_a <= top_b + SEPARATION_M:
            return False
        rot_b = np.asarray(b.rotation)
        if abs(rot_b[:, 2] @ self.up_cam) < 0.98:  # b is not upright: no horizontal top face
            return False
        local = rot_b.T @ np.subtract(a.centre, b.centre)
        return bool(np.all(np.abs(local[:2]) <= np.asarray(b.size[:2]) / 2))

    def above_below(self):
        return self._relation("above_below")

    def front_behind(self):
        return self._relation("front_behind")

    def closer(self):
        pair = self._class_balanced("closer", self.ordered_pairs("closer", fresh=True))
        if pair is None:
            return None
        nearer, farther = pair
        first, second, correct = (nearer, farther, 0) if self.rng.random() < 0.5 else (farther, nearer, 1)
        q = {"category": "closer", "objects": [first.instance_id, second.instance_id], "tool": TOOL["closer"]}
        return self._choice(q, self._phrase("closer", a=first.label, b=second.label),
                            [first.label, second.label], correct)

    def class_counts(self):
        """Visible instances per class, for the classes counting / existence may ask about."""
        counts: dict[str, int] = {}
        for o in self.s.objects:
            if o.pixels >= self.min_pixels:
                counts[o.class_name] = counts.get(o.class_name, 0) + 1
        return {c: n for c, n in counts.items() if c not in self.classes_ambiguous}

    @staticmethod
    def counting_weights(counts: dict[str, int]) -> dict[str, float]:
        """Chance that counting asks about each class: classes seen more than once get 70%
        between them, so "1" does not dominate the answers."""
        classes = sorted(counts)
        multi = [c for c in classes if counts[c] > 1]
        if not multi:
            return {c: 1 / len(classes) for c in classes}
        return {c: 0.3 / len(classes) + (0.7 / len(multi) if c in multi else 0.0) for c in classes}

    def counting(self):
        counts = {c: n for c, n in self.class_counts().items() if self._fresh("counting", class_name=c)}
        if not counts:
            return None
        weights = self.counting_weights(counts)
        classes = list(weights)
        cls = classes[self.rng.choice(len(classes), p=np.array(list(weights.values())))]
        q = {"category": "counting", "objects": [o.instance_id for o in self.s.objects
                                                 if o.class_name == cls and o.pixels > 0],
             "tool": TOOL["counting"], "class_name": cls, "value": counts[cls]}
        text = self._phrase("counting", p=PLURAL[cls])
        n = counts[cls]
        options = self._exchangeable_options("counting", [cls], n, count=True)
        if options is None:
            q.update(form="numeric", question=text, answer=n, unit=None, tolerance={"exact": True})
            return q
        return self._choice(q, text, [str(int(v)) for v in options], 0)

    def existence_status(self) -> dict[str, bool]:
        """Classes an existence question may ask about: True if present, False if absent (a
        barely visible class is neither, so every answer is unambiguous)."""
        present = set(self.class_counts())
        seen = {o.class_name for o in self.s.objects if o.pixels > 0}
        names = [n for n in self.s.class_names or [] if n not in ("background", "floor", "wall")]
        status = {c: True for c in present}
        status.update({c: False for c in names if c not in seen and c not in self.classes_ambiguous})
        return status

    def existence(self):
        """A class picked with weight exp(g) if present and exp(-g) if absent (g: the prior's
        calibrated score), so that over a split every class is a "yes" as often as a "no"."""
        asked = {k[2] for k in self.used if k[0] == "existence"}
        status = {c: v for c, v in sorted(self.existence_status().items()) if c not in asked}
        if not status:
            return None
        classes = list(status)
        g = np.array([self.priors.existence.get(c, 0.0) * (1 if status[c] else -1) for c in classes])
        w = np.exp(g - g.max())
        cls = classes[self.rng.choice(len(classes), p=w / w.sum())]
        return {"category": "existence", "objects": [o.instance_id for o in self.s.objects
                                                     if o.class_name == cls and o.pixels > 0],
                "tool": TOOL["existence"], "class_name": cls, "form": "yesno",
                "question": self._phrase("existence", c=cls),
                "answer": "yes" if status[cls] else "no", "tolerance": {"exact": True}}

    def make(self, n: int) -> list[dict]:
        """Up to n distinct questions, balanced across categories, then across answers.

        Each slot goes to the category asked least so far in the tally (the scene's, when shared),
        less one for every earlier view in which it was not answerable at all (so a category that
        needs a particular configuration, like above/below, catches up when it can be asked), ties
        going to pair relations (only sometimes answerable, while single-object questions almost
        always are) and then at random; a category is asked at most MAX_PER_VIEW times per view
        (ONCE_PER_VIEW ones once) and never twice about the same object(s) or class in one view."""
        out: list[dict] = []
        per_view: Counter = Counter()
        exhausted: set[str] = set()
        while len(out) < n:
            noise = self.rng.random(len(CATEGORIES))
            order = sorted((c for c in CATEGORIES if c not in exhausted
                            and per_view[c] < (1 if c in ONCE_PER_VIEW else MAX_PER_VIEW)),
                           key=lambda c: (self.tally[c] - self.tally[f"{c}:missed"], c not in PAIR_FIRST,
                                          noise[CATEGORIES.index(c)]))
            q = None
            for category in order:
                q = getattr(self, category)()
                if q is not None:
                    break
                exhausted.add(category)
            if q is None:
                break
            category = q["category"]
            self.used.add(self._key(category, q["objects"] if category not in ("counting", "existence") else (),
                                    q.get("class_name")))
            per_view[category] += 1
            self.tally[category] += 1
            if category in RELATION_WORDS:
                self.tally[f"{category}:{q.get('answer_text', q['answer'])}"] += 1
            q["qid"] = f"{self.s.sample_id}_q{len(out):02d}"
            out.append(q)
        for category in exhausted - set(per_view):  # not answerable in this view at all
            self.tally[f"{category}:missed"] += 1
        return out


def make_questions(sample: Sample, rng: np.random.Generator, n: int = 8, tally: Counter | None = None) -> list[dict]:
    """Up to n questions about `sample`; pass one `tally` Counter for all views of a scene."""
    return QuestionMaker(sample, rng, tally=tally).make(n)


def load_questions(split_dir: str | Path) -> list[dict]:
    """The question records of a split written by `training.data.synth` (its questions.jsonl)."""
    path = Path(split_dir) / "questions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no question records (python -m training.data.synth writes them)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_choice(q: dict) -> bool:
    """Multiple choice and yes/no (scored against chance); the rest are numeric (scored by tolerance)."""
    return q["form"] in ("choice", "yesno")


def answer_text(q: dict) -> str:
    """The answer as it would appear inside \\boxed{} (letter for choices, number, yes/no)."""
    if q["form"] == "numeric":
        return f"{q['answer']:.2f}" if isinstance(q["answer"], float) else str(q["answer"])
    return str(q["answer"])


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?\d*\.?\d+")


def extract_answer(prediction: str) -> str:
    """Content of the last \\boxed{} if any, else of <answer>...</answer>, else the whole text."""
    boxed = _BOXED.findall(prediction)
    if boxed:
        return boxed[-1].strip()
    m = re.search(r"<answer>(.*?)</answer>", prediction, re.S)
    return (m.group(1) if m else prediction).strip()


def score(q: dict, prediction: str) -> bool:
    """Rule-based judge for these questions (tolerance as documented at the top of this module)."""
    ans = extract_answer(prediction)
    low = ans.lower()
    if q["form"] == "yesno":
        return low.startswith(q["answer"])
    if q["form"] == "choice":
        m = re.match(r"\(?([A-D])\)?(?:\W|$)", ans)
        if m:
            return m.group(1) == q["answer"]
        return low.strip(". ") == q["answer_text"].lower()
    m = _NUMBER.search(ans)
    if not m:
        return False
    value = float(m.group())
    if q.get("unit") == "m" and re.search(r"\d\s*cm\b", low):
        value /= 100.0
    if "relative" in q["tolerance"]:
        return abs(value - q["answer"]) <= q["tolerance"]["relative"] * abs(q["answer"])
    return value == q["answer"]
