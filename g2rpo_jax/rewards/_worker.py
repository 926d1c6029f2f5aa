"""Reward worker process: `python -m g2rpo_jax.rewards._worker FD WARM_UP DIE_WITH_PARENT`
(see pool.py). It names the task kinds a worker runs, so that the pool imports neither reward."""

import sys

from g2rpo_jax.rewards.code_tests import run_job
from g2rpo_jax.rewards.math_answers import math_outcome_in_main_thread, warm_up
from g2rpo_jax.rewards.pool import worker_main

# kind -> what runs it; the kinds `RewardPool.score_math` and `scoring.score_outcomes` send.
HANDLERS = {"math": math_outcome_in_main_thread, "job": run_job}

if __name__ == "__main__":
    worker_main(int(sys.argv[1]), HANDLERS, warm_up if sys.argv[2] == "1" else None,
                sys.argv[3] == "1")
