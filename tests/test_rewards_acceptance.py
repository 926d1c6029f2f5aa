"""Acceptance of the rewards on the real benchmark files in ../shared/data.

The folder is <repo>/../shared/data, or the G2RPO_SHARED_DATA environment variable; without it
the module is skipped. Files are read with plain json here (not through g2rpo_jax.data), so
these checks depend on the rewards module alone. Everything runs batched on a 2-process pool.
"""

import gzip
import json
import logging
import os
import time

import pytest

from g2rpo_jax import rewards
from g2rpo_jax.rewards.scoring import score_outcomes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("G2RPO_SHARED_DATA", os.path.join(REPO_ROOT, "..", "shared", "data"))
REQUIRED = ["humaneval/HumanEval.jsonl.gz", "mbpp/mbpp.jsonl", "mbpp/sanitized-mbpp.json",
            "math500/test.jsonl"]

pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(os.path.exists(os.path.join(SHARED_DATA, name)) for name in REQUIRED),
        reason=f"real benchmark files not found at {SHARED_DATA} (set G2RPO_SHARED_DATA to their folder)"),
]

# Generous: the machine running the suite may be busy; reference solutions take well under 1 s.
SETTINGS = rewards.RewardSettings(code_limits=rewards.SandboxLimits(timeout_s=20.0))
logger = logging.getLogger(__name__)


def path_of(name):
    return os.path.join(SHARED_DATA, name)


def read_jsonl(name):
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path_of(name), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fenced(code):
    return f"```python\n{code}\n```"


@pytest.fixture(scope="module")
def pool():
    with rewards.RewardPool(2) as reward_pool:
        yield reward_pool


def score(pool, completions, examples):
    started = time.monotonic()
    outcomes = score_outcomes(completions, examples, SETTINGS, pool)
    logger.info("scored %d in %.1f s", len(outcomes), time.monotonic() - started)
    return outcomes


def failures(ids, outcomes, expected):
    return [(i, o.value, o.detail) for i, o in zip(ids, outcomes) if o.value != expected]


# --------------------------------------------------------------------------------------------
# Code.

def humaneval_tests(row):
    return {"kind": "assert", "test": row["test"], "entry_point": row["entry_point"]}


def test_humaneval_canonical_solutions_score_one(pool):
    rows = read_jsonl("humaneval/HumanEval.jsonl.gz")
    assert len(rows) == 164
    outcomes = score(pool, [fenced(r["prompt"] + r["canonical_solution"]) for r in rows],
                     [{"tests": humaneval_tests(r)} for r in rows])
    assert failures([r["task_id"] for r in rows], outcomes, 1.0) == []


def test_humaneval_prompts_returning_none_score_zero(pool):
    rows = read_jsonl("humaneval/HumanEval.jsonl.gz")
    outcomes = score(pool, [fenced(r["prompt"] + "    return None\n") for r in rows],
                     [{"tests": humaneval_tests(r)} for r in rows])
    credited = [(r["task_id"], o.value) for r, o in zip(rows, outcomes) if o.value != 0.0]
    assert len(credited) <= 5, credited


def test_mbpp_reference_solutions_score_one(pool):
    rows = read_jsonl("mbpp/mbpp.jsonl")
    assert len(rows) == 974
    tests = [{"kind": "assert", "entry_point": "",
              "test": r["test_setup_code"] + "\n" + "\n".join(r["test_list"] + r["challenge_test_list"])}
             for r in rows]
    outcomes = score(pool, [fenced(r["code"]) for r in rows], [{"tests": t} for t in tests])
    assert failures([r["task_id"] for r in rows], outcomes, 1.0) == []


def test_sanitized_mbpp_reference_solutions_score_one(pool):
    with open(path_of("mbpp/sanitized-mbpp.json"), encoding="utf-8") as f:
        rows = json.load(f)
    assert len(rows) == 427
    tests = [{"kind": "assert", "entry_point": "",
              "test": "\n".join(r["test_imports"] + r["test_list"])} for r in rows]
    outcomes = score(pool, [fenced(r["code"]) for r in rows], [{"tests": t} for t in tests])
    assert failures([r["task_id"] for r in rows], outcomes, 1.0) == []


# --------------------------------------------------------------------------------------------
# Math.

@pytest.fixture(scope="module")
def math500():
    rows = read_jsonl("math500/test.jsonl")
    assert len(rows) == 500
    return rows


def test_math500_boxed_gold_answers_match_themselves(pool, math500):
    outcomes = score(pool, [f"The final answer is $\\boxed{{{r['answer']}}}$." for r in math500],
                     [{"answer": r["answer"]} for r in math500])
    assert failures([r["unique_id"] for r in math500], outcomes, 1.0) == []


def test_math500_gold_solutions_score_one(pool, math500):
    outcomes = score(pool, [r["solution"] for r in math500], [{"answer": r["answer"]} for r in math500])
    missed = failures([r["unique_id"] for r in math500], outcomes, 1.0)
    assert len(missed) <= 10, missed


def test_math500_answer_of_another_problem_scores_zero(pool, math500):
    shifted = math500[1:] + math500[:1]
    outcomes = score(pool, [f"\\boxed{{{other['answer']}}}" for other in shifted],
                     [{"answer": r["answer"]} for r in math500])
    credited = [(r["answer"], other["answer"]) for r, other, o in zip(math500, shifted, outcomes)
                if o.value != 0.0]
    assert len(credited) <= 5, credited
