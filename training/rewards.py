"""COOPER's CPR reward (upstream `train/grpo/interleave_grpo.py`) and the judges of the answer term.

A rollout's reward is the sum (weights 1 by default) of three terms:

- answer: 1.0 if the judge accepts the final turn's answer, else 0.0. The judge sees the content of
  `<answer>...</answer>` in the final turn (the whole final turn if it has none), as upstream's
  LLM judge does. Judges are pluggable: `RuleJudge` (the synthetic set's verifiable answers,
  `training.data.questions.score`) and `LLMJudge` (an OpenAI-compatible chat endpoint).
- format: 1.0 if every turn but the last is `<think>...</think>` then a tool tag and the last is
  `<think>...</think>` then `<answer>...</answer>` (full matches after stripping), else 0.0.
- exploration (group-level): per question, count the rollouts that called a tool (a turn before the
  last that is a well-formed tool call, upstream's test). Below `threshold` (3 of 8 upstream), each
  rollout of a "positive"-flag question that called one gets +0.2; above it, each rollout of a
  "negative"-flag question that called one gets -0.2; otherwise 0.

Upstream's format reward slices its input in place (`completions[i] = completions[i][3:]`) and the
exploration reward, called after it on the same list, slices again, so upstream only counts tool
calls from the second generated turn on. That is a bug, not the method: here the first turn counts.

Advantages are group-normalised as TRL's GRPO with `scale_rewards=True`: (r - mean) / (std + 1e-4),
std with Bessel's correction (`torch.std`).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ANSWER_TURN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
TOOL_TURNS = {
    "depth": re.compile(r"<think>.*?</think>\s*<depth-estimation>.*?</depth-estimation>", re.DOTALL),
    "segmentation": re.compile(r"<think>.*?</think>\s*<segmentation>.*?</segmentation>", re.DOTALL),
}
ANSWER_CONTENT = re.compile(r"<answer>([\s\S]*?)</answer>")
FLAGS = ("positive", "negative", "boundary")


def is_tool_turn(text: str) -> bool:
    return any(p.fullmatch(text.strip()) for p in TOOL_TURNS.values())


def format_reward(turns: list[str]) -> float:
    if not turns:
        return 0.0
    ok = all(is_tool_turn(t) for t in turns[:-1]) and ANSWER_TURN.fullmatch(turns[-1].strip()) is not None
    return 1.0 if ok else 0.0


def called_tool(turns: list[str]) -> bool:
    """Upstream's `match_flag`: some turn before the last is a well-formed tool call."""
    return any(is_tool_turn(t) for t in turns[:-1])


def exploration_rewards(called: list[bool], flag: str, threshold: int = 3, bonus: float = 0.2) -> list[float]:
    """The group-level term for the rollouts of one question."""
    if flag not in FLAGS:
        raise ValueError(f"unknown flag {flag!r}; flags: {', '.join(FLAGS)}")
    count = sum(bool(c) for c in called)
    if count < threshold and flag == "positive":
        return [bonus if c else 0.0 for c in called]
    if count > threshold and flag == "negative":
        return [-bonus if c else 0.0 for c in called]
    return [0.0] * len(called)


def group_advantages(rewards: list[float] | np.ndarray, eps: float = 1e-4) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.size < 2:
        raise ValueError("group-normalised advantages need at least 2 rollouts per question")
    return (r - r.mean()) / (r.std(ddof=1) + eps)


def final_answer(turns: list[str]) -> str:
    """What the judge sees: the `<answer>` content of the final turn, else the whole final turn."""
    if not turns:
        return ""
    m = ANSWER_CONTENT.search(turns[-1])
    return (m.group(1) if m else turns[-1]).strip()


# ---- judges ----------------------------------------------------------------------------------------


class RuleJudge:
    """Verifiable answers of the synthetic set: `training.data.questions.score` against the question
    record (`questions.jsonl`, joined on `qid == data_id`)."""

    name = "rule"

    def __init__(self, questions: dict[str, dict]):
        self.questions = questions
        self.failures = 0  # a rule judge never fails; kept so every judge logs the same counters

    @classmethod
    def from_dir(cls, data_dir: str | Path) -> "RuleJudge":
        path = Path(data_dir) / "questions.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the rule judge needs the question records (or use judge: llm)")
        from training.data.questions import load_questions

        return cls({q["qid"]: q for q in load_questions(data_dir)})

    def __call__(self, rows: list[dict], answers: list[str]) -> list[float]:
        from training.data.questions import score

        out = []
        for row, answer in zip(rows, answers):
            q = self.questions.get(row["data_id"])
            if q is None:
                raise KeyError(f"no question record for data_id {row['data_id']!r} (rule judge)")
            # score() reads \boxed{} first, then <answer>, so hand it the answer wrapped as written
            out.append(1.0 if score(q, f"<answer>{answer}</answer>") else 0.0)
        return out


JUDGE_SYSTEM = ("You grade answers to questions about images. Decide whether the predicted answer means the "
                "same as the ground-truth answer. Paraphrases and synonyms count as the same; for numbers, "
                "convert units before comparing; for multiple choice, the chosen option must be the same. "
                "Reply with exactly one word: True or False.")
JUDGE_USER = "Question: {question}\nGround-truth answer: {truth}\nPredicted answer: {prediction}\nTrue or False?"


class LLMJudge:
    """An OpenAI-compatible `/chat/completions` endpoint as the judge (upstream: Qwen2.5-VL-72B,
    temperature 0, at most 512 tokens, 5 tries). Network errors, HTTP 429/5xx and replies that are
    neither True nor False are retried with exponential backoff; a question that still has no
    verdict scores 0 and is counted in `failures` (logged per step)."""

    name = "llm"

    def __init__(self, base_url: str, model: str, api_key: str = "-", retries: int = 5, timeout: float = 30.0,
                 backoff: float = 1.0, max_workers: int = 16, max_tokens: int = 512):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.max_workers, self.max_tokens = max_workers, max_tokens
        self.failures = 0

    def _ask(self, question: str, truth: str, prediction: str) -> bool | None:
        body = json.dumps({
            "model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens, "n": 1,
            "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                         {"role": "user", "content": JUDGE_USER.format(question=question, truth=truth,
                                                                       prediction=prediction)}],
        }).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        for attempt in range(self.retries):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                verdict = reply["choices"][0]["message"]["content"].strip().strip(".").lower()
                if verdict in ("true", "false"):
                    return verdict == "true"
            except urllib.error.HTTPError as e:
                if e.code not in (408, 429) and e.code < 500:
                    return None  # a request the server refuses will not succeed on a retry
            except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, IndexError, ValueError):
                pass
            if attempt < self.retries - 1:
                time.sleep(self.backoff * 2**attempt)
        return None

    def __call__(self, rows: list[dict], answers: list[str]) -> list[float]:
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            verdicts = list(pool.map(lambda ra: self._ask(ra[0]["question"], str(ra[0]["answer"]), ra[1]),
                                     zip(rows, answers)))
        self.failures += sum(v is None for v in verdicts)
        return [1.0 if v else 0.0 for v in verdicts]


def make_judge(kind: str, data_dir: str | Path | None = None, **llm) -> RuleJudge | LLMJudge:
    if kind == "rule":
        return RuleJudge.from_dir(data_dir)
    if kind == "llm":
        if not llm.get("base_url") or not llm.get("model"):
            raise ValueError("the llm judge needs judge_base_url and judge_model")
        return LLMJudge(**llm)
    raise ValueError(f"unknown judge {kind!r}; judges: rule, llm")
