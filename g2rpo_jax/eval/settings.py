"""The evaluation protocol: the config section of `python -m g2rpo_jax.eval` (also the training
loop's `eval` section) and `EvalSettings`, the typed settings `evaluate` takes, read from it.

Default protocol: the paper (arXiv 2508.13023) does not publish its evaluation settings, so the
defaults are Qwen3's recommended thinking-mode sampling (temperature 0.6, top-p 0.95, top-k 20),
4 samples per problem, and 4096 new tokens (the completion budget of the official training
recipe: a 4608-token model length with 512-token prompts). All are config values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ml_collections import config_dict

from g2rpo_jax.data.prompts import PromptSettings
from g2rpo_jax.eval.metrics import parse_pass_k
from g2rpo_jax.rewards import RewardSettings
from g2rpo_jax.rewards import get_default_config as reward_config
from g2rpo_jax.rewards import settings_from_config as reward_settings_from_config

DEFAULT_NUM_SAMPLES = 4
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 20
DEFAULT_MAX_NEW_TOKENS = 4096
DEFAULT_BATCH_SIZE = 64  # sampled rows (problems x samples) per sampler call


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How `evaluate` samples, prompts and scores (everything but the model, tasks and outputs).

    num_samples: completions per problem (n of pass@k). temperature, top_p, top_k (0 = off),
    max_new_tokens: the sampler's settings. batch_size: rows (problems x samples) per sampler
    call. limit: first N problems per task (None = all). seed: sampling seed (each task folds in
    its name). pass_k: the k values reported (() = 1 and num_samples). data_root: folder of the
    benchmark files (None = $G2RPO_SHARED_DATA, else <repo>/../shared/data). prompt: templates and
    the prompt-length policy. rewards: how completions are scored, and by how many processes.

    Construction normalises limit 0 to None, data_root '' to None and pass_k text ('1,4') to a
    tuple; it raises ValueError for num_samples or batch_size below 1.
    """

    num_samples: int = DEFAULT_NUM_SAMPLES
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None
    seed: int = 0
    pass_k: tuple[int, ...] = ()
    data_root: str | None = None
    prompt: PromptSettings = PromptSettings()
    rewards: RewardSettings = dataclasses.field(default_factory=RewardSettings)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples!r} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be >= 1")
        object.__setattr__(self, "limit", self.limit or None)
        object.__setattr__(self, "data_root", self.data_root or None)
        object.__setattr__(self, "pass_k", parse_pass_k(self.pass_k))

    @classmethod
    def from_config(cls, config: config_dict.ConfigDict, section: str = "") -> EvalSettings:
        """The settings of an eval config (`get_default_config`; tasks, checkpoint, dtype and
        output_dir are read by the caller). section: the config's name on the command line
        ('eval' in training), put in front of the key in error messages."""
        prefix = f"{section}." if section else ""
        try:
            return cls(
                num_samples=int(config.num_samples), temperature=float(config.temperature),
                top_p=float(config.top_p), top_k=int(config.top_k), max_new_tokens=int(config.max_new_tokens),
                batch_size=int(config.batch_size), limit=int(config.limit) or None, seed=int(config.seed),
                pass_k=str(config.pass_k), data_root=config.data_root or None,
                prompt=PromptSettings.from_config(config.prompt, "prompt"),
                rewards=reward_settings_from_config(config.rewards),
            )
        except ValueError as error:
            raise ValueError(f"{prefix}{error}") from None

    def sampler_options(self) -> dict[str, Any]:
        """The keyword arguments this protocol gives the sampler (besides stop and pad ids)."""
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k)

    def summary(self, pass_k: Sequence[int], model: str) -> dict[str, Any]:
        """The settings as reported in summary.json (pass_k resolved; model: 'sampler' or
        'completions_fn')."""
        prompt = self.prompt
        return dict(num_samples=self.num_samples, pass_k=list(pass_k), batch_size=self.batch_size,
                    limit=self.limit, seed=self.seed, **self.sampler_options(), template=prompt.template,
                    system=prompt.system, instruction=prompt.instruction, enable_thinking=prompt.enable_thinking,
                    max_prompt_tokens=prompt.max_prompt_tokens, overlong=prompt.overlong, model=model,
                    reward_weights=dict(self.rewards.weights), reward_custom=self.rewards.custom)


def get_default_config() -> config_dict.ConfigDict:
    """Every setting of `python -m g2rpo_jax.eval`; the training loop's `eval` section is this too."""
    config = config_dict.ConfigDict()
    config.checkpoint = ""      # Hugging Face directory (config.json, *.safetensors, tokenizer files)
    config.dtype = "float32"    # 'float32' or 'bfloat16'
    config.tasks = "math500"    # comma-separated registry names and/or file:PATH:ADAPTER
    config.data_root = ""       # '' = $G2RPO_SHARED_DATA, else <repo>/../shared/data
    config.limit = 0            # first N problems per task (0 = all)
    config.num_samples = DEFAULT_NUM_SAMPLES  # k completions per problem
    config.pass_k = ""          # comma-separated k values; '' = 1 and num_samples
    config.temperature = DEFAULT_TEMPERATURE
    config.top_p = DEFAULT_TOP_P
    config.top_k = DEFAULT_TOP_K
    config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    config.batch_size = DEFAULT_BATCH_SIZE  # rows (problems x samples) per sampler call
    config.seed = 0
    config.output_dir = ""      # required on the command line
    # template ('chat' or 'plain'), system, instruction, enable_thinking, max_prompt_tokens (0 = no
    # limit: benchmarks are scored on every problem), overlong; see PromptSettings.
    config.prompt = PromptSettings().as_config()
    config.rewards = reward_config()
    return config


def evaluate_options(config: config_dict.ConfigDict) -> EvalSettings:
    """The settings `evaluate` takes, read from an eval config (the same as EvalSettings.from_config)."""
    return EvalSettings.from_config(config)
