"""Test helpers for running real presets at test size: a tiny stand-in checkpoint with a chat
template, small training files in the paper tasks' layouts, and a compilation cache on disk so
that runs whose programs coincide compile them once (tests/test_presets.py, tests/test_sweep.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import jax
import pytest

from g2rpo_jax import eval as evaluation
from g2rpo_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real benchmark files, where `g2rpo_jax.eval` looks for them; tests that read them skip without.
SHARED_DATA = evaluation.default_data_root()
needs_shared_data = pytest.mark.skipif(
    not os.path.isdir(SHARED_DATA),
    reason=f"real benchmark files not found at {SHARED_DATA} (set G2RPO_SHARED_DATA to their folder)")
CHAR_TOKENIZER = os.path.join(REPO, "experiments", "data", "addition_tokenizer")
# A chat template of plain characters: the stand-in's character-level vocabulary spells it.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def load_config_module(name: str):
    """experiments/configs/<name>.py as a module (config files are not a package)."""
    path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_chat_stand_in(path: str) -> str:
    """A one-layer Qwen3 over the demo's character-level tokenizer (98 tokens, so the LM head is
    negligible), with a chat template added: what the paper presets' `chat` prompts need."""
    tokenizer = models.load_tokenizer(CHAR_TOKENIZER)
    models.write_random_checkpoint(path, models.tiny_qwen3_for(tokenizer).replace(num_layers=1), seed=0,
                                   tokenizer_dir=CHAR_TOKENIZER)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        tokenizer_config = json.load(handle)
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config, handle, indent=2)
    return path


def write_jsonl(path: str, records) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    return path


def math_records(count: int = 16) -> list[dict]:
    """OpenR1-Math-style records: a problem, a verified reasoning trace, the answer. The prompts are
    as long as `code_records`' (one length bucket), so both tasks run the same compiled programs."""
    return [{"uuid": f"sum-{i}", "answer": str(3 * i + 1),
             "problem": f"Tom has {i} apples and buys {2 * i + 1} more. How many apples does he have now?",
             "generations": [f"<think>{i}+{2 * i + 1}={3 * i + 1}</think>\\boxed{{{3 * i + 1}}}"],
             "correctness_math_verify": [True]} for i in range(count)]


def code_records(count: int = 16) -> list[dict]:
    """Stdin/stdout problems in the verifiable-coding-problems layout, each with its solution."""
    return [{"problem_id": f"add-{i}", "prompt": f"Read an integer n and print n + {i}.",
             "gold_standard_solution": f"```python\nprint(int(input()) + {i})\n```",
             "verification_info": {"test_cases": [{"type": "stdin_stdout", "input": "5\n", "output": f"{5 + i}\n"}]}}
            for i in range(count)]


@contextlib.contextmanager
def compilation_cache(path: str):
    """Compiled programs kept in `path` (every program, however fast to compile) while the block
    runs; the process's previous cache settings come back afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cache  # noqa: PLC0415

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cache.reset_cache()
    try:
        yield path
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        cache.reset_cache()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
