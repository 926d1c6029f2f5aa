"""Writes arithmetic.jsonl: small word-free arithmetic problems with worked solutions (MATH format).

The demo trains on these: a worked solution is the guidance trajectory and ends in \\boxed{answer},
so a rollout guided far enough is rewarded even when the model alone never is.

    python experiments/data/make_arithmetic.py   # rewrites experiments/data/arithmetic.jsonl
"""

import json
import os
import random


def problem(rng: random.Random, index: int) -> dict:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    kind = rng.choice(["sum", "difference", "product"])
    if kind == "sum":
        text, answer = f"What is ${a} + {b}$?", a + b
        steps = f"Adding the numbers gives ${a} + {b} = {a + b}$."
    elif kind == "difference":
        a, b = max(a, b), min(a, b)
        text, answer = f"What is ${a} - {b}$?", a - b
        steps = f"Subtracting gives ${a} - {b} = {a - b}$."
    else:
        a, b = a % 13 + 2, b % 13 + 2
        text, answer = f"What is ${a} \\times {b}$?", a * b
        steps = f"Multiplying gives ${a} \\times {b} = {a * b}$."
    return {"problem": text, "solution": f"{steps} The answer is $\\boxed{{{answer}}}$.",
            "answer": str(answer), "type": kind, "unique_id": f"arithmetic/{index}"}


def main(count: int = 256, seed: int = 0) -> None:
    rng = random.Random(seed)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arithmetic.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps(problem(rng, i)) + "\n")
    print(f"wrote {count} problems to {path}")


if __name__ == "__main__":
    main()
