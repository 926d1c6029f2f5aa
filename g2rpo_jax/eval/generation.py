"""The rows of an evaluation, (problem, sample) pairs: planned into chunks, generated (by the
sampler or an external completions function) and scored with the verifiable rewards."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Sequence

import jax

from g2rpo_jax import data, rewards, sampling

# Reward events counted per task (the keys of `rewards.score_batch`'s stats).
REWARD_EVENTS = ("parse_failures", "timeouts", "sandbox_errors", "executions")

Row = tuple[int, int]  # (problem index, sample index)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One completion: its text (special tokens removed), its length in tokens (None when an
    external function wrote it) and why it ended: 'stop' (a stop token), 'length' (ran out of
    tokens) or 'external'."""

    text: str
    num_tokens: int | None
    finish_reason: str


def plan_rows(prompt_lengths: Sequence[int], num_samples: int, batch_size: int) -> list[list[Row]]:
    """Chunks of at most batch_size (problem index, sample index) rows, problems shortest-prompt first.

    A problem's k samples are adjacent (a chunk boundary may still split them); sorting by length
    keeps each chunk's prompt-length bucket (and its padding) small. The order depends only on
    the inputs: reproducible.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], i))
    rows = [(problem, sample) for problem in order for sample in range(num_samples)]
    return [rows[start: start + batch_size] for start in range(0, len(rows), batch_size)]


def task_rng(seed: int, task_name: str) -> jax.Array:
    """Per-task key: adding or reordering tasks does not change another task's samples."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(task_name.encode()) & 0x7FFFFFFF)


def sample_chunk(cfg, params, tokenizer, prompts: Sequence[Sequence[int]], *, rng: jax.Array,
                 max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 stop_ids: Sequence[int], pad_id: int, mesh=None, rules=None) -> list[Generation]:
    """One sampler call over a chunk of N prompts (token ids); N completions decoded without
    special tokens, each ending at its first stop id or after max_new_tokens tokens. With a mesh,
    rows are sharded as `rules` (the config's mesh.rules; None = the defaults) say."""
    layout = {} if rules is None else {"rules": tuple(rules)}
    out = sampling.sample(cfg, params, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=tuple(stop_ids),
                          rng=rng, pad_id=pad_id, mesh=mesh, **layout)
    generations = []
    for row in range(len(prompts)):
        length = int(out.lengths[row])
        ids = out.tokens[row, :length].tolist()  # [L_row]
        stopped = length > 0 and ids[-1] in stop_ids
        generations.append(Generation(tokenizer.decode(ids, skip_special_tokens=True), length,
                                      "stop" if stopped else "length"))
    return generations


def external_generations(completions_fn: Callable, examples: Sequence[data.Example],
                         num_samples: int) -> list[list[Generation]]:
    """completions_fn(examples, k) as Generations [P][k]; raises ValueError on any other shape."""
    produced = completions_fn(list(examples), num_samples)
    if len(produced) != len(examples) or any(len(p) != num_samples for p in produced):
        raise ValueError(
            f"completions_fn must return {len(examples)} lists of num_samples={num_samples} strings "
            f"(one list per example); got {len(produced)} lists of lengths "
            f"{sorted({len(p) for p in produced})}"
        )
    return [[Generation(str(text), None, "external") for text in texts] for texts in produced]


def _reward_details(completion: str, example: data.Example, scores: dict[str, float],
                    settings: rewards.RewardSettings) -> dict[str, Any]:
    """What a reader of generations.jsonl needs to audit a score: each reward before weighting
    (accuracy, format, and custom when `rewards.custom` is set), the extracted answer and the gold
    one (math), or whether a program was found (code)."""
    details: dict[str, Any] = dict(scores)
    if example.is_code:
        program = rewards.extract_program(completion, settings.code_extract)
        details["has_program"] = program is not None
    else:
        details["extracted_answer"] = rewards.extract_answer(completion, tuple(settings.math.answer_sources))
        details["gold_answer"] = example.answer
    return details


def score_rows(completions: Sequence[str], examples: Sequence[data.Example],
               settings: rewards.RewardSettings, pool: rewards.RewardPool | None):
    """Scores N completions against their examples (in a pool's processes, or in this process
    when pool is None). Returns (rewards [N], accuracies [N], details per row, event counts)."""
    reward, per_kind, stats = rewards.score_batch(list(completions), list(examples), pool=pool,
                                                  settings=settings)
    details = [_reward_details(c, e, {name: float(values[i]) for name, values in per_kind.items()}, settings)
               for i, (c, e) in enumerate(zip(completions, examples))]
    return reward, per_kind["accuracy"], details, stats
