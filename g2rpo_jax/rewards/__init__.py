"""Verifiable rewards: math answers (math-verify), code run in a sandbox, output format.

    r = rewards.math_reward(completion, answer)                      # 1.0 / 0.0
    r = rewards.code_reward(completion, tests, timeout_s=10.0)       # fraction of tests passed
    r = rewards.format_reward(completion, kind="math")               # 1.0 / 0.0
    with rewards.RewardPool(2) as pool:
        rewards_, per_kind, stats = rewards.score_batch(completions, examples, weights, pool)
    rewards.sandbox_protections()                                    # what isolation is active
    RewardSettings(custom="my_lab.rewards:brevity")                  # a reward of one's own (custom.py)
"""

from g2rpo_jax.rewards.code_tests import code_outcome, code_reward, extract_program
from g2rpo_jax.rewards.config import (REWARD_NAMES, RewardSettings, get_default_config,
                                      settings_from_config)
from g2rpo_jax.rewards.custom import custom_rewards, load_reward_function
from g2rpo_jax.rewards.formatting import format_reward
from g2rpo_jax.rewards.math_answers import (MathSettings, extract_answer, math_outcome,
                                            math_reward)
from g2rpo_jax.rewards.outcome import RewardOutcome
from g2rpo_jax.rewards.pool import RewardPool
from g2rpo_jax.rewards.sandbox import SandboxLimits, run_python, sandbox_protections
from g2rpo_jax.rewards.scoring import score_batch

__all__ = [
    "REWARD_NAMES", "MathSettings", "RewardOutcome", "RewardPool", "RewardSettings",
    "SandboxLimits", "code_outcome", "code_reward", "custom_rewards", "extract_answer", "extract_program",
    "format_reward", "get_default_config", "load_reward_function", "math_outcome", "math_reward", "run_python",
    "sandbox_protections", "score_batch", "settings_from_config",
]
