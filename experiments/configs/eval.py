"""Benchmark evaluation config: `python -m g2rpo_jax.eval --config=experiments/configs/eval.py[:ARG]`.

ARG (optional) is either a paper preset (below) or, as before, a comma-separated task list such as
`:math500,aime24,aime25,humaneval` evaluated with the module defaults. Every key can be overridden:
--config.checkpoint=DIR --config.num_samples=8 --config.limit=50 --config.prompt.enable_thinking=False
--config.rewards.num_workers=4 ... The plain flags (--checkpoint, --tasks, --output_dir,
--num_samples, ...) are applied after these overrides.

The defaults are the protocol stated in g2rpo_jax/eval/settings.py: temperature 0.6, top-p 0.95, top-k 20
(Qwen3's thinking-mode sampling), 4 samples per problem, 4096 new tokens, pass@1 and pass@4.

Paper presets (`paper_<benchmark>`, and `paper_math` / `paper_code` for a task's whole set): the
protocol of arXiv 2508.13023 where it is known, temperature 0.6, top-p 0.95, top-k 20 and pass@1
averaged over k samples, with 4096 new tokens (the official training recipe's budget: a 4608-token
model length with 512-token prompts). The paper publishes neither k nor an evaluation budget per
benchmark, so k = 8 everywhere is ours: the sampling noise of each problem's estimate falls as
1/k, which matters on the 30 problems of an AIME set, while MATH500 costs 4000 generations.
Benchmarks without a shipped file read one you
place under the data root ($G2RPO_SHARED_DATA, else ../shared/data) or name with
--config.tasks=file:PATH:ADAPTER:

  paper_gpqa           gpqa/gpqa_diamond.jsonl   GPQA fields (Question, Correct Answer,
                                                 Incorrect Answer 1-3) or question/choices/answer
  paper_livecodebench  livecodebench/test.jsonl  stdin/stdout problems (the `code_stdio` adapter)
"""

import g2rpo_jax.eval as evaluation

PAPER_TEMPERATURE = 0.6
PAPER_TOP_P = 0.95
PAPER_TOP_K = 20
PAPER_NUM_SAMPLES = 8  # ours (see the docstring)
PAPER_MAX_NEW_TOKENS = 4096  # official training budget: 4608-token model length - 512 prompt tokens

GPQA_FILE = "gpqa/gpqa_diamond.jsonl"
LIVECODEBENCH_FILE = "livecodebench/test.jsonl"

# preset -> its tasks (registry names or file:PATH:ADAPTER, PATH relative to the data root)
PRESETS = {
    "paper_math500": "math500",
    "paper_aime24": "aime24",
    "paper_aime25": "aime25",
    "paper_gpqa": f"file:{GPQA_FILE}:multiple_choice",
    "paper_humaneval": "humaneval",
    "paper_mbpp": "mbpp",
    "paper_livecodebench": f"file:{LIVECODEBENCH_FILE}:code_stdio",
    "paper_math": "math500,aime24,aime25",
    "paper_code": "humaneval,mbpp",
}


def paper_protocol(config) -> None:
    """The sampling and scoring every paper preset shares."""
    config.temperature = PAPER_TEMPERATURE
    config.top_p = PAPER_TOP_P
    config.top_k = PAPER_TOP_K
    config.num_samples = PAPER_NUM_SAMPLES
    config.pass_k = "1"  # pass@1 averaged over the k samples, as the paper reports
    config.max_new_tokens = PAPER_MAX_NEW_TOKENS
    config.dtype = "bfloat16"  # the checkpoints were trained in bf16
    config.prompt.template = "chat"


def get_config(arg: str = ""):
    config = evaluation.get_default_config()
    if arg in PRESETS:
        paper_protocol(config)
        config.tasks = PRESETS[arg]
    elif arg.startswith("paper_"):
        raise ValueError(f"eval preset {arg!r} is unknown; valid: {sorted(PRESETS)}")
    elif arg:
        config.tasks = arg
    return config
