"""Spatial questions whose answers are computed from a sample's ground truth, and their scoring.

Definitions (these are what the answers mean, and what the evaluator checks):
- distance_camera: Euclidean distance from the camera centre to the object's 3-D box centre (m).
- distance_objects: distance between the two objects' 3-D box centres (m).
- size: the longest side of the object's 3-D box (m).
- height: the object's vertical extent along gravity (m).
- left_right: camera frame x; asked only when the two boxes do not overlap in x and the image
  columns of their centres agree.
- above_below: along gravity (the pose is recorded; camera roll is near zero); asked only when
  the boxes do not overlap vertically.
- front_behind: camera frame z (depth); asked only when the boxes do not overlap in depth.
- closer: which box centre is nearer the camera; asked only when the distances differ by >= 15%.
- counting / existence: instances of a class with >= `min_pixels` visible pixels; a class with a
  barely visible instance (0 < pixels < min_pixels) is never asked about, so answers are unambiguous.
Numeric answers are scored correct within a relative error of `RELATIVE_TOLERANCE` (25%, the
usual "within a factor" band for metric estimates from one image); counts must be exact. Each
question records its tolerance.
"""

from __future__ import annotations

import re

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
    """Draws balanced questions for one sample from its ground truth."""

    def __init__(self, sample: Sample, rng: np.random.Generator, min_pixels: int | None = None):
        self.s, self.rng = sample, rng
        h, w = sample.rgb.shape[:2]
        self.min_pixels = min_pixels if min_pixels is not None else max(40, int(0.0015 * h * w))
        seen = [o for o in sample.objects if o.pixels > 0]
        labels = [o.label for o in seen]
        # Referable objects: clearly visible, in front of the camera, with a unique description.
        self.objs = [o for o in seen if o.pixels >= self.min_pixels and o.centre[2] > 0
                     and labels.count(o.label) == 1]
        self.classes_ambiguous = {o.class_name for o in sample.objects if 0 < o.pixels < self.min_pixels}
        self.up_cam = self._up_in_camera()

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
        return box_corners(np.array(o.centre), np.array(o.size), np.array(o.rotation))

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
        order = self.rng.permutation(len(options))  # uniform answer letter
        options = [options[i] for i in order]
        letter = LETTERS[int(np.nonzero(order == correct_index)[0][0])]
        listing = " ".join(f"({LETTERS[i]}) {opt}" for i, opt in enumerate(options))
        q.update(form="choice", question=f"{text} Options: {listing}", options=options, answer=letter,
                 answer_text=options[LETTERS.index(letter)], tolerance={"exact": True})
        return q

    def _pair(self, accept):
        pairs = [(a, b) for a in self.objs for b in self.objs if a is not b and accept(a, b)]
        return self._pick(pairs) if pairs else None

    # ---- categories ----------------------------------------------------------------------------
    def distance_camera(self):
        if not self.objs:
            return None
        o = self._pick(self.objs)
        return self._numeric("distance_camera", self._phrase("distance_camera", a=o.label),
                             np.linalg.norm(o.centre), [o.instance_id])

    def distance_objects(self):
        pair = self._pair(lambda a, b: True)
        if pair is None:
            return None
        a, b = pair
        return self._numeric("distance_objects", self._phrase("distance_objects", a=a.label, b=b.label),
                             np.linalg.norm(np.subtract(a.centre, b.centre)), [a.instance_id, b.instance_id])

    def size(self):
        if not self.objs:
            return None
        o = self._pick(self.objs)
        return self._numeric("size", self._phrase("size", a=o.label), max(o.size), [o.instance_id])

    def height(self):
        if not self.objs:
            return None
        o = self._pick(self.objs)
        return self._numeric("height", self._phrase("height", a=o.label), o.height, [o.instance_id])

    def _relation(self, category, coord, image_check=None):
        """A question about a pair separated along `coord(corners)`; positive = a before b."""
        def separated(a, b):
            ca, cb = coord(self._corners(a)), coord(self._corners(b))
            ok = ca.max() < cb.min() - 0.02
            return ok and (image_check is None or image_check(a, b))
        pair = self._pair(separated)
        if pair is None:
            return None
        a, b = pair
        if self.rng.random() < 0.5:  # ask both ways round so both answers are equally common
            a, b, correct = b, a, 1
        else:
            correct = 0
        q = {"category": category, "objects": [a.instance_id, b.instance_id], "tool": TOOL[category]}
        return self._choice(q, self._phrase(category, a=a.label, b=b.label),
                            list(RELATION_WORDS[category]), correct)

    def left_right(self):
        def same_in_image(a, b):
            ua, ub = project(np.array([a.centre, b.centre]), self.s.intrinsics)[:, 0]
            return ua < ub
        return self._relation("left_right", lambda c: c[:, 0], same_in_image)

    def above_below(self):
        return self._relation("above_below", lambda c: -(c @ self.up_cam))

    def front_behind(self):
        return self._relation("front_behind", lambda c: c[:, 2])

    def closer(self):
        def clear(a, b):
            da, db = np.linalg.norm(a.centre), np.linalg.norm(b.centre)
            return da * 1.15 < db
        pair = self._pair(clear)
        if pair is None:
            return None
        a, b = pair
        first, second, correct = (a, b, 0) if self.rng.random() < 0.5 else (b, a, 1)
        q = {"category": "closer", "objects": [a.instance_id, b.instance_id], "tool": TOOL["closer"]}
        return self._choice(q, self._phrase("closer", a=first.label, b=second.label),
                            [first.label, second.label], correct)

    def _class_counts(self):
        counts: dict[str, int] = {}
        for o in self.s.objects:
            if o.pixels >= self.min_pixels:
                counts[o.class_name] = counts.get(o.class_name, 0) + 1
        return {c: n for c, n in counts.items() if c not in self.classes_ambiguous}

    def counting(self):
        counts = self._class_counts()
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
        counts = self._class_counts()
        present = sorted(counts)
        absent = sorted({n for n in self.s.class_names or [] if n not in ("background", "floor", "wall")}
                        - {o.class_name for o in self.s.objects if o.pixels > 0} - self.classes_ambiguous)
        want_yes = self.rng.random() < 0.5
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
        """Up to n distinct questions, cycling the categories in random order for balance.

        Pair relations are tried first: they are only sometimes answerable, while single-object
        questions almost always are, so trying them last evens out the category counts."""
        out: list[dict] = []
        while len(out) < n:
            added = False
            order = sorted(self.rng.permutation(CATEGORIES), key=lambda c: c not in PAIR_FIRST)
            for category in order:
                q = getattr(self, str(category))()
                if q is None or any(q["question"] == p["question"] for p in out):
                    continue
                q["qid"] = f"{self.s.sample_id}_q{len(out):02d}"
                out.append(q)
                added = True
                if len(out) == n:
                    break
            if not added:
                break
        return out


def make_questions(sample: Sample, rng: np.random.Generator, n: int = 8) -> list[dict]:
    return QuestionMaker(sample, rng).make(n)


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
