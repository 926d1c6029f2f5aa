"""Code-reward throughput: sandboxed executions per second for HumanEval-sized programs.

Programs: HumanEval canonical solutions with their tests (from ../shared/data when present, or
G2RPO_SHARED_DATA), otherwise synthetic programs of the same size (about 1 KB of code and tests).
Measures, on the same machine in one run:
  sequential  one execution after another in this process (score_batch with pool=None)
  batched     the same executions on a RewardPool of --workers processes (started beforehand)
the CPU time the sandbox costs per execution (an empty program, all processes included), and
the CPU time of a whole sequential execution (harness, program and tests included).

    python experiments/benchmarks/rewards.py [--n 164 --workers 2 --isolation auto]

The last line is `rewards/batched executions per second: X.X`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import time

from g2rpo_jax import rewards
from g2rpo_jax.rewards.scoring import score_outcomes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.environ.get("G2RPO_SHARED_DATA", os.path.join(REPO_ROOT, "..", "shared", "data"))


def humaneval_batch(n: int) -> tuple[list[str], list[dict], str]:
    path = os.path.join(SHARED_DATA, "humaneval", "HumanEval.jsonl.gz")
    if os.path.exists(path):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        source = "HumanEval canonical solutions"
    else:
        rows = [synthetic_row(i) for i in range(164)]
        source = "synthetic HumanEval-sized programs"
    rows = (rows * (n // len(rows) + 1))[:n]
    completions = [f"```python\n{r['prompt']}{r['canonical_solution']}\n```" for r in rows]
    examples = [{"tests": {"kind": "assert", "test": r["test"], "entry_point": r["entry_point"]}}
                for r in rows]
    return completions, examples, source


def synthetic_row(i: int) -> dict:
    prompt = (f"from typing import List\n\n\ndef running_max_{i}(numbers: List[int]) -> List[int]:\n"
              '    """Return the running maximum of the list.\n'
              "    >>> running_max([1, 3, 2, 5])\n    [1, 3, 3, 5]\n" + "    " + "x" * 200 + '\n    """\n')
    solution = ("    result, best = [], None\n    for value in numbers:\n"
                "        best = value if best is None else max(best, value)\n"
                "        result.append(best)\n    return result\n")
    test = ("def check(candidate):\n    assert candidate([]) == []\n"
            "    assert candidate([1, 3, 2, 5]) == [1, 3, 3, 5]\n"
            "    assert candidate([5, 4, 3]) == [5, 5, 5]\n"
            "    assert candidate(list(range(1000))) == list(range(1000))\n") + "#" * 300 + "\n"
    return {"prompt": prompt, "canonical_solution": solution, "test": test,
            "entry_point": f"running_max_{i}"}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (every sandbox process)."""
    usages = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def sandbox_cpu_per_execution(limits: rewards.SandboxLimits, repeats: int = 20) -> float:
    """CPU seconds (all sandbox processes) of running an empty program."""
    rewards.run_python({"main.py": "pass"}, "main.py", limits=limits)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(repeats):
        rewards.run_python({"main.py": "pass"}, "main.py", limits=limits)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=164, help="executions per measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--isolation", default="auto", choices=("auto", "namespaces", "rlimits"))
    args = parser.parse_args()

    limits = rewards.SandboxLimits(timeout_s=20.0, isolation=args.isolation)
    settings = rewards.RewardSettings(code_limits=limits)
    protections = rewards.sandbox_protections(limits, log=False)
    completions, examples, source = humaneval_batch(args.n)
    print(f"programs: {args.n} x {source}; isolation: {protections['isolation']}; "
          f"cpus: {os.cpu_count()}; load average: {os.getloadavg()[0]:.2f}")

    cpu = sandbox_cpu_per_execution(limits)
    print(f"rewards/sandbox cpu per empty execution: {cpu * 1000:.1f} ms")

    started, cpu_before = time.perf_counter(), cpu_seconds()
    outcomes = score_outcomes(completions, examples, settings, None)
    sequential = len(outcomes) / (time.perf_counter() - started)
    cpu = (cpu_seconds() - cpu_before) / len(outcomes)
    assert all(o.value == 1.0 for o in outcomes), "a reference solution failed"
    print(f"rewards/sequential executions per second: {sequential:.1f}")
    # Less sensitive than the rates to other work on a shared machine.
    print(f"rewards/cpu per execution: {cpu * 1000:.1f} ms (all processes)")

    with rewards.RewardPool(args.workers) as pool:
        score_outcomes(completions[:args.workers], examples[:args.workers], settings, pool)  # warm
        started = time.perf_counter()
        outcomes = score_outcomes(completions, examples, settings, pool)
        batched = len(outcomes) / (time.perf_counter() - started)
    assert all(o.value == 1.0 for o in outcomes), "a reference solution failed"
    print(f"rewards/batched executions per second: {batched:.1f} ({args.workers} workers)")


if __name__ == "__main__":
    main()
