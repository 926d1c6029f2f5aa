"""Reward worker process: `python -m g2rpo_jax.rewards._worker FD WARM_UP DIE_WITH_PARENT`
(see pool.py)."""

import sys

from g2rpo_jax.rewards.pool import worker_main

if __name__ == "__main__":
    worker_main(int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1")
