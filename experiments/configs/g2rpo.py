"""Training configs: `--config=experiments/configs/g2rpo.py:<preset>[,<variant>]`.

Presets
  demo        4-digit addition, a tiny Qwen3 with a character-level tokenizer, CPU (`make demo`
              runs the whole experiment: experiments/demo.py)
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

import os

import ml_collections

from g2rpo_jax import data, guidance, optim, rewards, sharding, train_step
from g2rpo_jax import eval as evaluation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_DATA = os.path.join(REPO, "experiments", "data")  # the demo's files, whatever the working directory
VARIANTS = ("grpo", "clip_higher", "naive", "adaptive", "ratio", "linear_decay", "sft")


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict({
        "checkpoint": "",  # Hugging Face directory of the policy (and reference) model
        "reference": "",  # '' = the same checkpoint
        "dtype": "bfloat16",
        "random_init": False,  # write a tiny random-init checkpoint into the workdir instead
        "random_init_tokenizer": "",  # its tokenizer directory ('' = Qwen3's); sets the vocabulary
        "random_init_seed": 0,
    })
    cfg.data = data.get_default_config()
    cfg.rewards = rewards.get_default_config()
    cfg.sampling = ml_collections.ConfigDict({
        "max_new_tokens": 1024, "top_p": 1.0, "top_k": 0,
        "dtype": "",  # the sampler's dtype, '' = model.dtype (e.g. 'bfloat16' for an f32 train step)
        "refill_rounds": 0,  # dynamic sampling: extra rounds that replace zero-spread groups (0 = off)
    })
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
        "max_checkpoints": 3,  # the latest kept (0 = all); with eval_every also the best-scoring one
        "max_nonfinite_steps": 10,  # skipped non-finite steps in a row that stop the run; 0 = never stop
        "eval_every": 0,  # steps between evaluations with the `eval` section; 0 = never
        "save_hf_at_end": True,
    })
    cfg.eval = evaluation.get_default_config()  # tasks, sampling and scoring of periodic evaluation
    cfg.eval.tasks = "math500"
    return cfg


def demo(cfg: ml_collections.ConfigDict) -> None:
    """The demo task: 4-digit addition worked column by column (experiments/data/make_addition.py),
    a tiny Qwen3 with a character-level tokenizer, CPU. `make demo` (experiments/demo.py) runs the
    SFT warm start (`demo,sft`, from random init) and then the compared methods from its checkpoint
    with --config.model.checkpoint=<sft run>/final_hf."""
    cfg.model.random_init = True
    cfg.model.random_init_tokenizer = os.path.join(DEMO_DATA, "addition_tokenizer")
    cfg.model.dtype = "float32"
    cfg.data.source = os.path.join(DEMO_DATA, "addition_train.jsonl")
    cfg.data.adapter = "math"
    cfg.data.template = "plain"  # 'Question:\n3482+1759=\n\nAnswer:\n'
    cfg.data.instruction = ""
    cfg.data.max_prompt_tokens = 64
    cfg.data.batch_size = 8
    cfg.rewards.num_workers = 0
    cfg.rewards.weights.format = 0.0  # reward 1 only for the exact final answer
    cfg.sampling.max_new_tokens = 68  # the full trajectory is 62-64 tokens, then <eos>
    cfg.step.group_size = 8
    cfg.step.beta = 0.0
    # Guidance: the four columns are the first 50 tokens (they end at 11, 23, 36, 50); the boxed
    # answer is never forced.
    cfg.guidance.alpha = 0.5
    cfg.guidance.initial_length = 24  # about two of the four columns
    cfg.guidance.min_length = 0
    cfg.guidance.max_length = 50
    cfg.guidance.delta = 4
    cfg.guidance.window = 3
    cfg.optim.learning_rate = 1e-4  # GRPO degrades on this task from about 2e-4
    cfg.optim.min_learning_rate = 1e-4  # constant
    cfg.optim.total_steps = 300
    cfg.run.workdir = "runs/demo/g2rpo_a"
    cfg.run.total_steps = 300
    cfg.run.checkpoint_every = 100
    cfg.run.eval_every = 50
    cfg.run.save_hf_at_end = True
    # Held-out accuracy: greedy, unguided, on the disjoint held-out split (never trained on).
    cfg.eval.tasks = f"file:{os.path.join(DEMO_DATA, 'addition_heldout.jsonl')}:math"
    cfg.eval.num_samples = 1
    cfg.eval.temperature = 1.0
    cfg.eval.top_k = 1  # greedy
    cfg.eval.top_p = 1.0
    cfg.eval.max_new_tokens = 68
    cfg.eval.batch_size = 512
    cfg.eval.prompt.template = "plain"
    cfg.eval.prompt.instruction = ""
    cfg.eval.rewards.num_workers = 0


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
