"""Acceptance: every adapter on the real public benchmark files in ../shared/data.

The folder is located as <repo>/../shared/data, or by the G2RPO_SHARED_DATA environment variable;
without it the whole module is skipped. Record counts are those stated in SOURCES.md there.
"""

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from g2rpo_jax import data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("G2RPO_SHARED_DATA", os.path.join(REPO_ROOT, "..", "shared", "data"))

pytestmark = pytest.mark.skipif(
    not os.path.isdir(SHARED_DATA),
    reason=f"real benchmark files not found at {SHARED_DATA} (set G2RPO_SHARED_DATA to their folder)",
)

# (file, adapter, expected records, has trajectories)
REAL_FILES = [
    ("math500/test.jsonl", "math", 500, True),
    ("math_train/math_test5000.jsonl", "math", 5000, True),
    ("math_train/math_test4500_excl_math500.jsonl", "math", 4500, True),
    ("gsm8k/test.jsonl", "gsm8k", 1319, True),
    ("gsm8k/train.jsonl", "gsm8k", 7473, True),
    ("aime/aime24_test.jsonl", "aime", 30, True),
    # Both AIME25 copies carry no worked solutions (one repeats the answer as "solution"), so
    # their trajectories are empty: guidance cannot be used on AIME25.
    ("aime/aime25_test.jsonl", "aime", 30, False),
    ("aime/aime25_test_with_urls.jsonl", "aime", 30, False),
    ("math_train/aime_1983_2023_rllm.json", "aime", 975, True),
    ("humaneval/HumanEval.jsonl.gz", "humaneval", 164, True),
    ("mbpp/mbpp.jsonl", "mbpp", 974, True),
    ("mbpp/sanitized-mbpp.json", "mbpp", 427, True),
]


def path_of(name: str) -> str:
    return os.path.join(SHARED_DATA, name)


def raw_count(name: str) -> int:
    """Records counted with plain json, independent of the loader."""
    path = path_of(name)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        if name.endswith(".json"):
            return len(json.load(handle))
        return sum(1 for line in handle if line.strip())


def raw_rows(name: str) -> list[dict]:
    with open(path_of(name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.mark.parametrize("name,adapter,expected,has_trajectories", REAL_FILES, ids=[f[0] for f in REAL_FILES])
def test_real_file_loads_completely(name, adapter, expected, has_trajectories):
    examples = data.load_examples(path_of(name), adapter)
    assert len(examples) == expected == raw_count(name)
    assert len({e.id for e in examples}) == expected  # ids are unique
    for example in examples:
        assert example.prompt.strip()
        if example.is_code:
            entry_point = example.tests["entry_point"]
            if entry_point:  # HumanEval: the test defines check(), to be called on the entry point
                assert "def check(" in example.tests["test"], example.id
                assert re.search(rf"^def {re.escape(entry_point)}\s*\(", example.trajectory, re.M), example.id
            else:  # MBPP: module-level asserts call the function under test
                called = example.metadata["function_name"]
                assert called and re.search(rf"\b{re.escape(called)}\s*\(", example.tests["test"]), example.id
        else:
            assert example.answer.strip()
        assert bool(example.trajectory.strip()) == has_trajectories, example.id


def test_math_box_extraction_agrees_with_the_answer_fields():
    """MATH500 ships an `answer` field; the last-box rule must reproduce it from the solutions,
    both on MATH500 itself and on the same 500 problems inside the 5000-problem MATH test file
    (which has no answer field)."""
    rows = raw_rows("math500/test.jsonl")
    assert [data.last_boxed_answer(r["solution"]) for r in rows] == [r["answer"] for r in rows]
    answer_by_problem = {r["problem"]: r["answer"] for r in rows}
    full = data.load_examples(path_of("math_train/math_test5000.jsonl"), "math")
    shared = [e for e in full if e.prompt in answer_by_problem]
    assert len(shared) == 500
    assert [e.answer for e in shared] == [answer_by_problem[e.prompt] for e in shared]


def test_gsm8k_and_aime_answers_are_integers():
    for name, adapter, _, _ in REAL_FILES:
        if adapter not in ("gsm8k", "aime"):
            continue
        for example in data.load_examples(path_of(name), adapter):
            value = int(example.answer)  # raises if not an integer
            assert str(value) == example.answer
            if adapter == "aime":
                assert 0 <= value <= 999


# Gold code that takes 5-12 s on a 2-core machine (sums amicable numbers below 10000); it is
# loaded and checked like the rest, just not executed here.
SLOW_GOLD = {"mbpp/123"}


def test_gold_code_passes_its_own_tests():
    """HumanEval and MBPP reference trajectories, run under the rewards' assert contract (code,
    test, then check(entry_point) when there is one) in one child process with a fresh namespace
    per problem, all pass."""
    script = textwrap.dedent(f"""
        import contextlib, io, json
        from g2rpo_jax import data
        failures, total = [], 0
        for name in ("humaneval/HumanEval.jsonl.gz", "mbpp/mbpp.jsonl", "mbpp/sanitized-mbpp.json"):
            adapter = "humaneval" if "HumanEval" in name else "mbpp"
            for example in data.load_examples({SHARED_DATA!r} + "/" + name, adapter):
                if example.id in {sorted(SLOW_GOLD)!r}:
                    continue
                total += 1
                program = example.trajectory + "\\n\\n" + example.tests["test"]
                if example.tests["entry_point"]:
                    program += "\\ncheck(" + example.tests["entry_point"] + ")\\n"
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        exec(compile(program, example.id, "exec"), {{"__name__": "__main__"}})
                except BaseException as error:
                    failures.append((example.id, repr(error)[:200]))
        print(json.dumps({{"total": total, "failures": failures}}))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["total"] == 164 + 974 + 427 - 2 * len(SLOW_GOLD)  # mbpp/123 is in both MBPP files
    assert report["failures"] == []


def test_eval_benchmark_prompts_fit_and_trajectories_round_trip():
    from g2rpo_jax.models.tokenizer import load_tokenizer, qwen3_tokenizer_dir

    tokenizer = load_tokenizer(qwen3_tokenizer_dir())
    for name, adapter in [("math500/test.jsonl", "math"), ("humaneval/HumanEval.jsonl.gz", "humaneval")]:
        examples = data.load_examples(path_of(name), adapter)
        prepared = data.prepare_prompts(examples, tokenizer, enable_thinking=False, max_prompt_tokens=1024)
        assert prepared.report.dropped == 0 and len(prepared) == len(examples)
        for example, ids in list(zip(prepared.examples, prepared.trajectory_ids))[:20]:
            decoded = tokenizer.decode(list(ids))
            assert example.trajectory.rstrip() in decoded


def test_real_gold_code_scores_one_with_the_rewards():
    """A sample of real HumanEval/MBPP problems, fully guided (the fenced reference code as the
    completion), scored by the project's sandboxed code reward."""
    from g2rpo_jax.rewards import code_reward

    for name, adapter in [("humaneval/HumanEval.jsonl.gz", "humaneval"), ("mbpp/mbpp.jsonl", "mbpp"),
                          ("mbpp/sanitized-mbpp.json", "mbpp")]:
        for example in data.load_examples(path_of(name), adapter)[::120]:
            completion = f"```python\n{example.trajectory.rstrip()}\n```"
            assert code_reward(completion, example.tests) == 1.0, example.id
