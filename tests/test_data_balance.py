"""Balance of a generated split: question categories, answer letters, yes/no and relation words.

Before the stacking layout and the tally-driven selection, above/below was ~0.1x the median
category and 2-option answers could drift; these bounds fail if that regresses."""

import json
import statistics
from collections import Counter

import pytest

from training.data.questions import CATEGORIES, RELATION_WORDS
from training.data.synth import generate


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    out = tmp_path_factory.mktemp("balance")
    card = generate(str(out), num_scenes=12, views=4, seed=4, split="train", width=160, height=120,
                    questions=8, traces=0, workers=2, progress=False)
    rows = [json.loads(line) for line in open(out / "train" / "questions.jsonl")]
    assert sum(card["questions_per_category"].values()) == len(rows)
    return rows


def test_every_category_near_the_median(questions):
    counts = Counter(q["category"] for q in questions)
    median = statistics.median(counts[c] for c in CATEGORIES)
    for c in CATEGORIES:  # the issue asks for balance; "within a factor 1.5" of the median
        assert 0.67 * median <= counts[c] <= 1.5 * median, (c, dict(counts))


def test_answer_letters_uniform_per_option_count(questions):
    by_n: dict[int, Counter] = {}
    for q in questions:
        if q["form"] == "choice":
            by_n.setdefault(len(q["options"]), Counter())[q["answer"]] += 1
    assert {2, 4} <= set(by_n)
    for n, letters in by_n.items():
        total = sum(letters.values())
        assert set(letters) == set("ABCD"[:n]), (n, letters)
        for letter in "ABCD"[:n]:
            assert abs(letters[letter] - total / n) <= 0.15 * total / n + 3, (n, dict(letters))


def test_yes_no_and_relation_words_balanced(questions):
    # Existence balances yes and no per class by chance (priors.presence), not by a tally:
    # yes - no has a binomial spread of sqrt(n); 3.5 of them bound it.
    yes = Counter(q["answer"] for q in questions if q["form"] == "yesno")
    assert abs(yes["yes"] - yes["no"]) <= 3.5 * sum(yes.values()) ** 0.5, yes
    for category, (pos, neg) in RELATION_WORDS.items():
        words = Counter(q["answer_text"] for q in questions if q["category"] == category)
        assert abs(words[pos] - words[neg]) <= 0.15 * sum(words.values()) + 2, (category, words)


def test_no_question_repeated_within_a_view(questions):
    seen = set()
    for q in questions:
        key = (q["image"], q["category"], frozenset(q["objects"]), q.get("class_name"))
        assert key not in seen, q["qid"]
        seen.add(key)
