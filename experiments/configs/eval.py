"""Benchmark evaluation config: `python -m g2rpo_jax.eval --config=experiments/configs/eval.py[:TASKS]`.

TASKS (optional) is a comma-separated task list, e.g. `:math500,aime24,aime25,humaneval`.
Every key can be overridden: --config.checkpoint=DIR --config.num_samples=8 --config.limit=50
--config.prompt.enable_thinking=False --config.rewards.num_workers=4 ... The plain flags
(--checkpoint, --tasks, --output_dir, --num_samples, ...) are applied after these overrides.

The defaults are the protocol stated in g2rpo_jax/eval.py: temperature 0.6, top-p 0.95, top-k 20
(Qwen3's thinking-mode sampling), 4 samples per problem, 4096 new tokens, pass@1 and pass@4.
"""

import g2rpo_jax.eval as evaluation


def get_config(tasks: str = ""):
    config = evaluation.get_default_config()
    if tasks:
        config.tasks = tasks
    return config
