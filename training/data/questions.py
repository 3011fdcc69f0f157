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
`MAX_PER_VIEW` per category per view, never repeating a category's object(s) within a view. Yes/no
answers and the relation words go to whichever is behind in the tally; choice options are shuffled,
with the correct one on the letter least used so far by questions with as many options (ties at
random), so the letters are uniform over a question's options (two-option questions: A or B).
Numeric answers are scored correct within a relative error of `RELATIVE_TOLERANCE` (25%, the
usual "within a factor" band for metric estimates from one image); counts must be exact. Each
question records its tolerance.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from .catalogue import PLURAL
from .geometry import box_corners, project
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


class QuestionMaker:
    """Draws balanced questions for one sample from its ground truth.

    `tally` counts the questions already drawn per category and per category answer; pass the same
    Counter for every view of a scene so that the scene's questions are balanced as a whole."""

    def __init__(self, sample: Sample, rng: np.random.Generator, min_pixels: int | None = None,
                 tally: Counter | None = None):
        self.s, self.rng = sample, rng
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

    def _numeric(self, category, text, value, objects, unit="m"):
        q = {"category": category, "objects": objects, "tool": TOOL[category]}
        value = round(float(value), 2)
        if self.rng.random() < 0.5:
            q.update(form="numeric", question=text + UNIT_SUFFIX, answer=value, unit=unit,
                     tolerance={"relative": RELATIVE_TOLERANCE})
            return q
        options = self._numeric_options(value)
        return self._choice(q, text, [f"{v:.2f} m" for v in options], 0)

    def _numeric_options(self, value):
        """Correct value plus three distractors, each outside the tolerance band of the others."""
        factors = self.rng.permutation([0.3, 0.55, 1.6, 2.6, 4.0])
        opts = [value]
        for f in factors:
            v = round(value * f, 2)
            if v > 0 and all(abs(v - o) > 1.5 * RELATIVE_TOLERANCE * min(v, o) for o in opts):
                opts.append(v)
            if len(opts) == 4:
                break
        return opts

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

    def _pair(self, category, accept):
        pairs = [(a, b) for a in self.objs for b in self.objs
                 if a is not b and self._fresh(category, [a.instance_id, b.instance_id]) and accept(a, b)]
        return self._pick(pairs) if pairs else None

    # ---- categories ----------------------------------------------------------------------------
    def distance_camera(self):
        o = self._single("distance_camera")
        if o is None:
            return None
        return self._numeric("distance_camera", self._phrase("distance_camera", a=o.label),
                             np.linalg.norm(o.centre), [o.instance_id])

    def distance_objects(self):
        pair = self._pair("distance_objects", lambda a, b: True)
        if pair is None:
            return None
        a, b = pair
        return self._numeric("distance_objects", self._phrase("distance_objects", a=a.label, b=b.label),
                             np.linalg.norm(np.subtract(a.centre, b.centre)), [a.instance_id, b.instance_id])

    def size(self):
        o = self._single("size")
        if o is None:
            return None
        return self._numeric("size", self._phrase("size", a=o.label), max(o.size), [o.instance_id])

    def height(self):
        o = self._single("height")
        if o is None:
            return None
        return self._numeric("height", self._phrase("height", a=o.label), o.height, [o.instance_id])

    def _separated(self, coord, a, b) -> bool:
        """a's box lies entirely before b's along `coord(corners)`, with a clear gap."""
        return coord(self._corners(a)).max() < coord(self._corners(b)).min() - SEPARATION_M

    def _relation(self, category, before):
        """A question about a pair with `before(a, b)` true; positive = a before b."""
        pair = self._pair(category, lambda a, b: before(a, b) or before(b, a))
        if pair is None:
            return None
        a, b = pair
        if not before(a, b):
            a, b = b, a
        # Ask it whichever way round gives the answer word this scene has used least.
        correct = self._lagging(category, RELATION_WORDS[category])
        if correct == 1:
            a, b = b, a
        q = {"category": category, "objects": [a.instance_id, b.instance_id], "tool": TOOL[category]}
        return self._choice(q, self._phrase(category, a=a.label, b=b.label),
                            list(RELATION_WORDS[category]), correct)

    def left_right(self):
        def left_of(a, b):
            ua, ub = project(np.array([a.centre, b.centre]), self.s.intrinsics)[:, 0]
            return ua < ub and self._separated(lambda c: c[:, 0], a, b)
        return self._relation("left_right", left_of)

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
        def above(a, b):
            return self._separated(lambda c: -(c @ self.up_cam), a, b) or self._rests_on(a, b)
        return self._relation("above_below", above)

    def front_behind(self):
        return self._relation("front_behind", lambda a, b: self._separated(lambda c: c[:, 2], a, b))

    def closer(self):
        def clear(a, b):
            da, db = np.linalg.norm(a.centre), np.linalg.norm(b.centre)
            return da * 1.15 < db or db * 1.15 < da
        pair = self._pair("closer", clear)
        if pair is None:
            return None
        a, b = pair
        first, second, correct = (a, b, 0) if self.rng.random() < 0.5 else (b, a, 1)
        q = {"category": "closer", "objects": [a.instance_id, b.instance_id], "tool": TOOL["closer"]}
        nearer = 0 if np.linalg.norm(first.centre) < np.linalg.norm(second.centre) else 1
        return self._choice(q, self._phrase("closer", a=first.label, b=second.label),
                            [first.label, second.label], nearer)

    def _class_counts(self):
        counts: dict[str, int] = {}
        for o in self.s.objects:
            if o.pixels >= self.min_pixels:
                counts[o.class_name] = counts.get(o.class_name, 0) + 1
        return {c: n for c, n in counts.items() if c not in self.classes_ambiguous}

    def counting(self):
        counts = {c: n for c, n in self._class_counts().items() if self._fresh("counting", class_name=c)}
        if not counts:
            return None
        multi = [c for c, n in counts.items() if n > 1]
        # Prefer classes seen more than once, so "1" does not dominate the answers.
        cls = self._pick(multi if multi and self.rng.random() < 0.7 else sorted(counts))
        q = {"category": "counting", "objects": [o.instance_id for o in self.s.objects
                                                 if o.class_name == cls and o.pixels > 0],
             "tool": TOOL["counting"], "class_name": cls}
        text = self._phrase("counting", p=PLURAL[cls])
        n = counts[cls]
        if self.rng.random() < 0.5:
            q.update(form="numeric", question=text, answer=n, unit=None, tolerance={"exact": True})
            return q
        options = [n] + [int(v) for v in self.rng.permutation([m for m in range(max(0, n - 3), n + 4) if m != n])[:3]]
        return self._choice(q, text, [str(v) for v in options], 0)

    def existence(self):
        present = sorted(c for c in self._class_counts() if self._fresh("existence", class_name=c))
        absent = sorted({n for n in self.s.class_names or [] if n not in ("background", "floor", "wall")}
                        - {o.class_name for o in self.s.objects if o.pixels > 0} - self.classes_ambiguous
                        - {k[2] for k in self.used if k[0] == "existence"})
        want_yes = self._lagging("existence", ("yes", "no")) == 0
        if not (present if want_yes else absent):
            want_yes = not want_yes
        pool = present if want_yes else absent
        if not pool:
            return None
        cls = self._pick(pool)
        return {"category": "existence", "objects": [o.instance_id for o in self.s.objects
                                                     if o.class_name == cls and o.pixels > 0],
                "tool": TOOL["existence"], "class_name": cls, "form": "yesno", "question": self._phrase("existence", c=cls),
                "answer": "yes" if want_yes else "no", "tolerance": {"exact": True}}

    def make(self, n: int) -> list[dict]:
        """Up to n distinct questions, balanced across categories, then across answers.

        Each slot goes to the category asked least so far in the tally (the scene's, when shared),
        less one for every earlier view in which it was not answerable at all (so a category that
        needs a particular configuration, like above/below, catches up when it can be asked), ties
        going to pair relations (only sometimes answerable, while single-object questions almost
        always are) and then at random; a category is asked at most MAX_PER_VIEW times per view and
        never twice about the same object(s) or class in one view."""
        out: list[dict] = []
        per_view: Counter = Counter()
        exhausted: set[str] = set()
        while len(out) < n:
            noise = self.rng.random(len(CATEGORIES))
            order = sorted((c for c in CATEGORIES if c not in exhausted and per_view[c] < MAX_PER_VIEW),
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
            if category in RELATION_WORDS or category == "existence":
                self.tally[f"{category}:{q.get('answer_text', q['answer'])}"] += 1
            q["qid"] = f"{self.s.sample_id}_q{len(out):02d}"
            out.append(q)
        for category in exhausted - set(per_view):  # not answerable in this view at all
            self.tally[f"{category}:missed"] += 1
        return out


def make_questions(sample: Sample, rng: np.random.Generator, n: int = 8, tally: Counter | None = None) -> list[dict]:
    """Up to n questions about `sample`; pass one `tally` Counter for all views of a scene."""
    return QuestionMaker(sample, rng, tally=tally).make(n)


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
