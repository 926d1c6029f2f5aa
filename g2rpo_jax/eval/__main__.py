"""`python -m g2rpo_jax.eval ...`: see g2rpo_jax/eval/cli.py."""

import sys

from g2rpo_jax.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
