"""Training configs: `--config=experiments/configs/g2rpo.py:<preset>[,<variant>]`.

Presets
  demo        tiny random-init Qwen3 (real Qwen3 tokenizer), the shipped arithmetic set, CPU, ~2 min
  qwen3_math  a real Qwen3 checkpoint (--config.model.checkpoint=DIR) on a MATH-style training file
              (--config.data.source=FILE); the paper's math setting
  qwen3_code  the same for code (HumanEval/MBPP-style assert tests or stdin/stdout cases)

Variants (the methods the paper compares; each is only a few overrides)
  grpo          plain GRPO, no guidance
  clip_higher   GRPO with DAPO's asymmetric clipping (epsilon_high = 0.28)
  naive         fixed guidance length ("naive guidance")
  adaptive      G²RPO-A's reward-trend rule (the default)
  ratio         the official code's multiplicative rule, every 3 steps
  linear_decay  guidance length decays linearly to 0 (rule-based baseline)
  sft           supervised fine-tuning on the reference trajectories (cross-entropy, no sampling)

Any key can then be overridden: --config.guidance.alpha=0.5 --config.step.beta=0 ...
"""

import ml_collections

from g2rpo_jax import data, guidance, optim, rewards, sharding, train_step
from g2rpo_jax import eval as evaluation

VARIANTS = ("grpo", "clip_higher", "naive", "adaptive", "ratio", "linear_decay", "sft")


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict({
        "checkpoint": "",  # Hugging Face directory of the policy (and reference) model
        "reference": "",  # '' = the same checkpoint
        "dtype": "bfloat16",
        "random_init": False,  # write a tiny random-init checkpoint into the workdir instead
    })
    cfg.data = data.get_default_config()
    cfg.rewards = rewards.get_default_config()
    cfg.sampling = ml_collections.ConfigDict({"max_new_tokens": 1024, "top_p": 1.0, "top_k": 0})
    cfg.step = train_step.get_default_config()  # step.temperature is also the sampling temperature
    cfg.guidance = guidance.get_default_config()
    cfg.optim = optim.get_default_config()
    cfg.mesh = sharding.get_default_config()
    cfg.run = ml_collections.ConfigDict({
        "workdir": "runs/g2rpo",
        "total_steps": 500,
        "seed": 0,
        "log_every": 1,
        "checkpoint_every": 50,
        "max_checkpoints": 3,
        "eval_every": 0,  # steps between evaluations with the `eval` section; 0 = never
        "save_hf_at_end": True,
    })
    cfg.eval = evaluation.get_default_config()  # tasks, sampling and scoring of periodic evaluation
    cfg.eval.tasks = "math500"
    return cfg


def demo(cfg: ml_collections.ConfigDict) -> None:
    cfg.model.random_init = True
    cfg.model.dtype = "float32"
    cfg.data.source = "experiments/data/arithmetic.jsonl"
    cfg.data.adapter = "math"
    cfg.data.enable_thinking = False
    cfg.data.max_prompt_tokens = 128
    cfg.data.batch_size = 4
    cfg.rewards.num_workers = 0
    cfg.rewards.weights.format = 0.1
    cfg.sampling.max_new_tokens = 40
    cfg.step.group_size = 4
    cfg.step.beta = 0.0
    cfg.guidance.alpha = 0.5
    cfg.guidance.initial_length = 32
    cfg.guidance.max_length = 40
    cfg.guidance.min_length = 1
    cfg.guidance.delta = 4
    cfg.guidance.window = 3
    cfg.optim.learning_rate = 3e-3
    cfg.optim.min_learning_rate = 3e-4
    cfg.optim.warmup_steps = 2
    cfg.optim.total_steps = 16
    cfg.run.workdir = "runs/demo"
    cfg.run.eval_every = 8  # on a held-out slice of the same arithmetic set
    cfg.eval.tasks = "file:experiments/data/arithmetic.jsonl:math"
    cfg.eval.limit = 8
    cfg.eval.num_samples = 2
    cfg.eval.max_new_tokens = 40
    cfg.eval.prompt.enable_thinking = False
    cfg.eval.rewards.num_workers = 0
    cfg.run.total_steps = 16
    cfg.run.checkpoint_every = 8


def qwen3_math(cfg: ml_collections.ConfigDict) -> None:
    cfg.data.adapter = "math"
    cfg.data.batch_size = 16
    cfg.step.group_size = 8
    cfg.step.micro_batch_size = 16
    cfg.step.beta = 0.0
    cfg.sampling.max_new_tokens = 3072
    cfg.guidance.max_length = 3072
    cfg.optim.learning_rate = 1e-6
    cfg.optim.min_learning_rate = 1e-7
    cfg.optim.total_steps = 500
    cfg.mesh.mesh.fsdp = -1
    cfg.mesh.mesh.data = 1
    cfg.mesh.compilation_cache_dir = "~/.cache/g2rpo_jax/xla"
    cfg.run.eval_every = 50
    cfg.eval.tasks = "math500"


def qwen3_code(cfg: ml_collections.ConfigDict) -> None:
    qwen3_math(cfg)
    cfg.data.adapter = "humaneval"
    cfg.eval.tasks = "humaneval"


def apply_variant(cfg: ml_collections.ConfigDict, variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; valid: {VARIANTS}")
    if variant in ("grpo", "clip_higher"):
        cfg.guidance.mode = "none"
        cfg.guidance.alpha = 0.0
    if variant == "clip_higher":
        cfg.step.epsilon_high = 0.28
    if variant == "naive":
        cfg.guidance.mode = "fixed"
    if variant in ("adaptive", "ratio", "linear_decay"):
        cfg.guidance.mode = variant
    if variant == "linear_decay":
        cfg.guidance.total_steps = cfg.run.total_steps
    if variant == "sft":  # supervised fine-tuning on the reference trajectories, one per prompt
        cfg.guidance.mode = "none"
        cfg.guidance.alpha = 0.0
        cfg.step.loss_type = "sft"
        cfg.data.batch_size *= cfg.step.group_size  # as many sequences per step as the RL runs
        cfg.step.group_size = 1
        cfg.step.scale_rewards = "none"
        cfg.step.beta = 0.0
        cfg.step.num_iterations = 1


PRESETS = {"demo": demo, "qwen3_math": qwen3_math, "qwen3_code": qwen3_code}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    preset, _, variant = arg.partition(",")
    if preset not in PRESETS:
        raise ValueError(f"config preset {preset!r} is unknown; valid: {sorted(PRESETS)}")
    cfg = base_config()
    PRESETS[preset](cfg)
    apply_variant(cfg, variant or "adaptive")
    return cfg
