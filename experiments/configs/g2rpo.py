"""Training configs: `--config=experiments/configs/g2rpo.py:<preset>[,<method>]`.

Paper presets, one per model and task of arXiv 2508.13023, named `<model>_<task>`:

  model   qwen3_0_6b | qwen3_1_7b | qwen3_8b   mesh, micro-batch, remat, dtype (MODELS)
  task    math | code                          data, rewards, lengths, periodic eval (TASKS)
  method  sft | grpo | grpo_mu2 | clip_higher | naive | g2rpo_a | ratio | linear_decay (METHODS;
          `adaptive` is another name for g2rpo_a, the default)

  e.g.  --config=experiments/configs/g2rpo.py:qwen3_1_7b_math,g2rpo_a
        --config.model.checkpoint=/ckpt/Qwen3-1.7B   (a Hugging Face directory; always required)

  A paper preset is built in this order: the shared recipe (`paper_recipe`: the official code's
  hyperparameters, each value marked official or ours), then the task, then the model, then the
  method. Clip-Higher only differs from GRPO when an update is off policy, so `clip_higher` and
  the GRPO row it is compared with, `grpo_mu2`, both take μ = 2 optimizer updates per batch of
  rollouts; `grpo` keeps the official μ = 1. The base model's row is an evaluation, not a
  training run: `python -m g2rpo_jax.eval --config=experiments/configs/eval.py:paper_math`.
  `optim.total_steps` (updates = run.total_steps × μ), the 5% warmup and the linear-decay horizon
  follow `run.total_steps` and `step.num_iterations` when those are overridden.

Legacy presets (unchanged): `<preset>[,<variant>]`
  demo        4-digit addition, a tiny Qwen3 with a character-level tokenizer, CPU (`make demo`
              runs the whole experiment: experiments/demo.py)
  qwen3_math  a real Qwen3 checkpoint (--config.model.checkpoint=DIR) on a MATH-style training file
              (--config.data.source=FILE)
  qwen3_code  the same for code (HumanEval/MBPP-style assert tests or stdin/stdout cases)

Variants of the legacy presets (the methods the paper compares; each is only a few overrides)
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
        "random_init_architecture": "Qwen3ForCausalLM",  # or Qwen2ForCausalLM, LlamaForCausalLM
    })
    cfg.data = data.get_default_config()
    cfg.rewards = rewards.get_default_config()
    cfg.sampling = ml_collections.ConfigDict({
        "max_new_tokens": 1024, "top_p": 1.0, "top_k": 0,
        "dtype": "",  # the sampler's dtype, '' = model.dtype (e.g. 'bfloat16' for an f32 train step)
        "refill_rounds": 0,  # dynamic sampling: extra rounds that replace zero-spread groups (0 = off)
        "chunk_rows": 0,  # rollouts per sampler call, scored while the next chunk samples (0 = one call)
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
        # What the run writes besides metrics.jsonl (g2rpo_jax/run_logging.py).
        "rollout_samples": 2,  # groups per step logged to rollouts.jsonl (texts, rewards, advantages); 0 = off
        "tensorboard": True,  # TensorBoard event files in WORKDIR/tensorboard
        "wandb_project": "",  # Weights & Biases project ('' = off; needs the wandb package)
        "wandb_mode": "online",  # online | offline (upload later with `wandb sync`)
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
    cfg.run.workdir = "runs/demo/g2rpo_a"
    cfg.run.total_steps = 300
    cfg.optim.total_steps = cfg.run.get_ref("total_steps") * cfg.step.get_ref("num_iterations")  # follows both
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
    variant = {"g2rpo_a": "adaptive"}.get(variant, variant)  # the paper presets' name of the method
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; valid: {', '.join(VARIANTS)} (g2rpo_a is adaptive)")
    if variant in ("grpo", "clip_higher"):
        cfg.guidance.mode = "none"
        cfg.guidance.alpha = 0.0
    if variant == "clip_higher":
        cfg.step.epsilon_high = 0.28
    if variant == "naive":
        cfg.guidance.mode = "fixed"
    if variant in ("adaptive", "ratio", "linear_decay"):
        cfg.guidance.mode = variant
    if variant == "linear_decay":  # the decay horizon follows run.total_steps (a copy, not an alias)
        cfg.guidance.total_steps = cfg.run.get_ref("total_steps") + 0
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


# ----------------------------------------------------------------------------- paper presets
# Sources: "official" = the authors' code, T-Lab-CUHKSZ/G2RPO-A (recipes/config/G2RPO-Atrain.yaml
# on TRL 0.15's GRPOTrainer, whose defaults apply where the recipe is silent); "ours" = our choice,
# with the reason beside it. The paper's own tables give neither the batch nor the guided share.

OFF_POLICY_ITERATIONS = 2  # ours: μ of clip_higher and grpo_mu2 (any μ > 1 makes updates off policy)


def paper_recipe(cfg: ml_collections.ConfigDict) -> None:
    """What every paper preset shares: the official recipe, with our choices marked."""
    cfg.data.template = "chat"  # official: the model's chat template
    cfg.data.max_prompt_tokens = 512  # official max_prompt_length
    # ours: official 7 GPUs x 10 rollouts x 4 accumulation = 280 rollouts (28 prompts) an update;
    # 32 prompts split evenly over 8, 16 or 32 batch shards
    cfg.data.batch_size = 32
    cfg.data.seed = 42  # official seed
    cfg.step.group_size = 8  # ours: official num_generations 10; 8 keeps groups whole on power-of-two meshes
    cfg.step.temperature = 0.7  # official
    cfg.step.beta = 0.04  # official (TRL 0.15 default), k3 estimator
    cfg.step.epsilon_low = 0.2  # official (TRL 0.15 default)
    cfg.step.epsilon_high = 0.2  # official; clip_higher raises it
    cfg.step.num_iterations = 1  # official μ (TRL 0.15 default)
    cfg.step.loss_type = "grpo"  # official: TRL 0.15's per-sequence token mean
    cfg.sampling.max_new_tokens = 4096  # official: vllm_max_model_len 4608 minus 512 prompt tokens
    cfg.sampling.top_p = 1.0  # official (sampling defaults)
    cfg.sampling.top_k = 0
    cfg.rewards.weights.accuracy = 1.0  # official reward_weights: accuracy (or code) 1.0,
    cfg.rewards.weights.format = 0.1  # format 0.1
    cfg.guidance.alpha = 0.25  # ours: 2 guided rollouts of 8 (official code: 2 of every 12)
    cfg.guidance.initial_length = 3072  # official start and clamp of ℓ
    cfg.guidance.min_length = 1
    cfg.guidance.max_length = 3072
    cfg.guidance.window = 3  # T: official compares a step's reward with the two before it
    cfg.guidance.delta = 256  # Δ, ours: a full sweep of [1, 3072] in 12 steps
    cfg.guidance.update_every = 3  # official cycle of the ratio rule
    cfg.optim.learning_rate = 1e-5  # official
    cfg.optim.min_learning_rate = 1e-6  # official cosine_with_min_lr, min_lr_rate 0.1
    cfg.run.total_steps = 500  # ours (official: one epoch of its data set)
    cfg.run.seed = 42  # official seed
    cfg.run.checkpoint_every = 50
    cfg.run.eval_every = 50
    # Derived values: they follow run.total_steps and step.num_iterations when those are overridden.
    cfg.optim.total_steps = cfg.run.get_ref("total_steps") * cfg.step.get_ref("num_iterations")  # updates
    cfg.optim.warmup_steps = (cfg.optim.get_ref("total_steps") * 5) // 100  # official warmup_ratio 0.05
    cfg.guidance.total_steps = cfg.run.get_ref("total_steps") + 0  # linear_decay horizon (a copy, not an alias)
    cfg.mesh.compilation_cache_dir = "~/.cache/g2rpo_jax/xla"
    # Periodic evaluation during training: one sample per problem, the paper protocol otherwise;
    # the paper-row figures come from experiments/configs/eval.py on the final checkpoint.
    cfg.eval.num_samples = 1
    cfg.eval.max_new_tokens = 4096


def task_math(cfg: ml_collections.ConfigDict) -> None:
    """Math with reasoning traces: OpenR1-Math-220k, whose verified R1 trace is each problem's guide."""
    cfg.data.source = "open-r1/OpenR1-Math-220k"  # a Hugging Face name or a local copy (.jsonl/.parquet)
    cfg.data.adapter = "openr1_math"
    cfg.eval.tasks = "math500"


def task_code(cfg: ml_collections.ConfigDict) -> None:
    """Code with stdin/stdout tests and a reference solution as the guide (official: the CoT
    variant of these problems, Blancy/verifiable-coding-problems-CoT; any `code_stdio` file works)."""
    cfg.data.source = "open-r1/verifiable-coding-problems-python"
    cfg.data.adapter = "code_stdio"
    cfg.eval.tasks = "humaneval"


# Model presets. Sequences of 512 + 4096 tokens and an attention that forms [T, T] scores make
# activations, not parameters, the limit: every model rematerialises its layers and takes one
# group (8 rollouts) per batch shard per micro-batch. micro_batch_size counts rows over all batch
# shards; the values below are for 8 devices (8·G rows on 8 shards, or 4·G on 4 for the 8B):
# on N devices use (batch shards) × 8. `python -m g2rpo_jax.plan --config=...:<preset> --model_shape=
# qwen3-1.7b --search` says what a target holds and the first layout that fits (README's table: as
# configured, 8B does not fit a v5p-8's 4 chips; FSDP over the 4 with micro_batch_size=32 does).

def model_qwen3_0_6b(cfg: ml_collections.ConfigDict) -> None:
    """Qwen/Qwen3-0.6B: FSDP over every device, remat, bf16."""
    cfg.model.dtype = "bfloat16"  # official (bf16 training), for every model
    cfg.mesh.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
    cfg.step.remat = True
    cfg.step.micro_batch_size = 64


def model_qwen3_1_7b(cfg: ml_collections.ConfigDict) -> None:
    """Qwen/Qwen3-1.7B: as 0.6B."""
    model_qwen3_0_6b(cfg)


def model_qwen3_8b(cfg: ml_collections.ConfigDict) -> None:
    """Qwen/Qwen3-8B: FSDP × 2-way tensor parallel (halves each device's attention scores), remat, bf16."""
    cfg.model.dtype = "bfloat16"
    cfg.mesh.mesh.update({"data": 1, "fsdp": -1, "tensor": 2})
    cfg.step.remat = True
    cfg.step.micro_batch_size = 32


MODELS = {"qwen3_0_6b": model_qwen3_0_6b, "qwen3_1_7b": model_qwen3_1_7b, "qwen3_8b": model_qwen3_8b}
TASKS = {"math": task_math, "code": task_code}
METHODS = ("sft", "grpo", "grpo_mu2", "clip_higher", "naive", "g2rpo_a", "adaptive", "ratio", "linear_decay")
DEFAULT_METHOD = "g2rpo_a"


def paper_presets() -> list[str]:
    """Every `<model>_<task>` name."""
    return [f"{model}_{task}" for model in MODELS for task in TASKS]


def apply_method(cfg: ml_collections.ConfigDict, method: str) -> None:
    """A paper method on top of a paper preset (the legacy variants plus μ for the off-policy pair)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; valid: {METHODS} (e.g. qwen3_1_7b_math,g2rpo_a)")
    variant = {"g2rpo_a": "adaptive", "grpo_mu2": "grpo"}.get(method, method)
    apply_variant(cfg, variant)
    if method in ("grpo_mu2", "clip_higher"):
        cfg.step.num_iterations = OFF_POLICY_ITERATIONS


def paper_config(preset: str, method: str) -> ml_collections.ConfigDict:
    model, _, task = preset.rpartition("_")
    cfg = base_config()
    paper_recipe(cfg)
    TASKS[task](cfg)
    MODELS[model](cfg)
    apply_method(cfg, method)
    cfg.run.workdir = f"runs/{preset}/{method}"
    return cfg


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    preset, _, variant = arg.partition(",")
    if preset in paper_presets():
        return paper_config(preset, variant or DEFAULT_METHOD)
    if preset not in PRESETS:
        raise ValueError(f"config preset {preset!r} is unknown; valid: {sorted(PRESETS)} and the paper presets "
                         f"{paper_presets()} (<model>_<task>, then ,<method>)")
    cfg = base_config()
    PRESETS[preset](cfg)
    apply_variant(cfg, variant or "adaptive")
    return cfg
