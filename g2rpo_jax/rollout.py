"""Rollouts: a step's prompts -> guides -> sampling -> decoding -> rewards -> the train step's batch.

The training loop builds one `RolloutCollector` and calls `collect` once per step. With every
option at its default this is G²RPO-A's step: a fraction α of every group carries the first ℓ
tokens of its problem's reference trajectory at the start of its completion, and the whole batch
is sampled in one sampler call. The options (config keys, checked by `validate_options`):

  guidance.placement     'completion': the guide starts the completion and is trained as
                         `step.guided` says (G²RPO-A). 'prompt': the guide is appended to the
                         prompt as a hint (QuestA / POPE style): the sampled continuation is the
                         whole completion, its log-probs are conditioned on the hint, and the
                         hint is never a training target.
  guidance.trigger       'always': α of every group is guided. 'all_fail': every rollout is first
                         sampled without a guide; in the groups where no rollout has a positive
                         accuracy reward, the guided share (the same α, same positions rule) is
                         sampled again with guides and replaces those rollouts (BREAD / Guide
                         style). The re-sampled rollouts are the extra cost (`rollout/extra_rollouts`).
  guidance.length_unit   'tokens': ℓ tokens. 'percent': ℓ percent of the trajectory's tokens
                         (rounded half up). 'steps': the first ℓ reasoning steps, a step ending
                         after each occurrence of `guidance.step_delimiter` in the trajectory's
                         text, so a guide always ends on a step boundary.
  sampling.refill_rounds dynamic sampling that keeps the batch full (0 = off): groups whose
                         accuracy reward has zero spread (all right or all wrong: no advantage)
                         are dropped and the next batch of prompts is sampled to replace them,
                         for at most this many extra rounds. The accuracy reward decides, not the
                         total: a format bonus would otherwise make answers that are all wrong look
                         informative. If the rounds run out, the batch is completed with dropped
                         groups (zero advantage: they change only the loss's normaliser).
  sampling.dtype         the sampler's dtype ('' = model.dtype); e.g. bf16 sampling for an f32
                         train step. The step logs the log-prob drift (`mismatch/*`) and can
                         correct it (`step.tis`).
  sampling.chunk_rows    rollouts per sampler call (0 = all of a round in one call). With several
                         chunks and a reward pool, chunk i is decoded and scored in the background
                         while chunk i+1 samples (`pipelined`, as evaluation does). A rollout's
                         noise depends on its position in the round, not on the chunking.

Rewards always score the guide and the continuation together (the text the rollout stands for),
so the placement changes only what the loss trains on and what log-probs condition on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

import jax
import ml_collections
import numpy as np

from g2rpo_jax import advantages, data, guidance, guided_rollouts, models, sampling, sharding
from g2rpo_jax import train_step as train_step_lib

PLACEMENTS = ("completion", "prompt")
TRIGGERS = ("always", "all_fail")
LENGTH_UNITS = ("tokens", "percent", "steps")


# ----------------------------------------------------------------------------- guide lengths


def trajectory_step_ends(ids: Sequence[int], tokenizer: Any, delimiter: str) -> tuple[int, ...]:
    """Token counts at which the trajectory's reasoning steps end: after every token that completes
    an occurrence of `delimiter` in the decoded text, and at the end of the trajectory.

    Works on the trajectory's own ids (tokens decoded one at a time), never on a re-tokenized text
    prefix, whose token boundaries may differ. Raises ValueError for an empty delimiter.
    """
    if not delimiter:
        raise ValueError("guidance.step_delimiter='' is not valid with guidance.length_unit='steps'; "
                         "give the text that ends a reasoning step, e.g. '\\n\\n'")
    pieces = tokenizer.batch_decode([[int(t)] for t in ids])
    ends, text = [], ""
    for count, piece in enumerate(pieces, start=1):
        # An occurrence ending inside this piece starts after the last one the old text could hold.
        search_from = max(0, len(text) - len(delimiter) + 1)
        text += piece
        if delimiter in text[search_from:]:
            ends.append(count)
    if ids and (not ends or ends[-1] != len(ids)):
        ends.append(len(ids))
    return tuple(ends)


def guide_token_count(unit: str, length: int, trajectory_length: int, step_ends: Sequence[int] = ()) -> int:
    """How many trajectory tokens a guide of length ℓ = `length` in `unit` holds (≤ the trajectory).

    tokens: ℓ; percent: round(ℓ / 100 · trajectory length), halves up; steps: the token count at
    the end of the ℓ-th step (`trajectory_step_ends`), the whole trajectory past its last step.
    """
    if length <= 0 or trajectory_length <= 0:
        return 0
    if unit == "tokens":
        return min(length, trajectory_length)
    if unit == "percent":
        return min(math.floor(length * trajectory_length / 100 + 0.5), trajectory_length)
    if unit == "steps":
        return step_ends[length - 1] if length <= len(step_ends) else trajectory_length
    raise ValueError(f"guidance.length_unit={unit!r} is not valid; valid: {LENGTH_UNITS}")


# ----------------------------------------------------------------------------- groups


def all_fail_groups(accuracy: np.ndarray, group_size: int) -> np.ndarray:
    """bool [N / G]: groups in which no rollout has a positive accuracy reward."""
    return np.asarray(accuracy, np.float64).reshape(-1, group_size).max(axis=1) <= 0


def informative_groups(accuracy: np.ndarray, group_size: int) -> np.ndarray:
    """bool [N / G]: groups whose accuracy rewards are not all equal (a non-zero advantage spread)."""
    return ~np.asarray(advantages.zero_std_groups(np.asarray(accuracy, np.float32), group_size))


def fill_order(informative: np.ndarray, num_groups: int) -> np.ndarray:
    """Indices of the `num_groups` groups a refilled batch keeps: informative groups in sampling
    order first, then (only if too few) dropped ones in sampling order. int [num_groups]."""
    informative = np.asarray(informative, bool)
    if informative.size < num_groups:
        raise ValueError(f"{informative.size} groups were sampled, fewer than the batch's {num_groups}")
    ranked = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])
    return ranked[:num_groups]


# ----------------------------------------------------------------------------- rollouts


@dataclasses.dataclass
class Rollouts:
    """N scored rollouts as host values, the G rollouts of a group adjacent; L = max_new_tokens."""

    problem_ids: np.ndarray  # int32 [N]: the problem's row in the prepared data
    prompts: list  # N prompt id sequences (with the hint appended when placement = 'prompt')
    guided: np.ndarray  # bool [N]: the rollout carried a non-empty guide (in completion or prompt)
    tokens: np.ndarray  # int32 [N, L]: guide tokens (placement 'completion') then sampled ones
    mask: np.ndarray  # int32 [N, L]: 1 up to and including the first EOS
    guided_mask: np.ndarray  # int32 [N, L]: 1 on forced guide tokens (none with placement 'prompt')
    sampler_logprobs: np.ndarray  # float32 [N, L]: the sampler's log-probs, 0 on guide tokens
    texts: list  # N decoded texts the rewards scored (guide included)
    rewards: np.ndarray  # float32 [N]: total reward
    per_kind: dict  # reward name -> float32 [N]
    stats: dict  # reward event -> count over the N rollouts

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def accuracy(self) -> np.ndarray:
        return self.per_kind["accuracy"]

    def take(self, index: Sequence[int]) -> "Rollouts":
        """The rollouts at `index` (ints), in that order; event counts are kept whole (they count
        the work done, including rollouts that are left out)."""
        index = np.asarray(index, np.int64)
        return dataclasses.replace(
            self, **{name: getattr(self, name)[index] for name in _ARRAY_FIELDS},
            prompts=[self.prompts[i] for i in index], texts=[self.texts[i] for i in index],
            per_kind={k: v[index] for k, v in self.per_kind.items()})

    @classmethod
    def concat(cls, parts: Sequence["Rollouts"]) -> "Rollouts":
        first = parts[0]
        return dataclasses.replace(
            first, **{name: np.concatenate([getattr(p, name) for p in parts]) for name in _ARRAY_FIELDS},
            prompts=[x for p in parts for x in p.prompts], texts=[x for p in parts for x in p.texts],
            per_kind={k: np.concatenate([p.per_kind[k] for p in parts]) for k in first.per_kind},
            stats={k: sum(p.stats.get(k, 0) for p in parts) for k in first.stats})

    def with_rows(self, index: Sequence[int], other: "Rollouts") -> "Rollouts":
        """A copy whose rollouts at `index` are replaced by `other`'s (len(other) == len(index))."""
        order = np.arange(len(self))
        order[np.asarray(index, np.int64)] = len(self) + np.arange(len(other))
        return Rollouts.concat([self, other]).take(order)


_ARRAY_FIELDS = ("problem_ids", "guided", "tokens", "mask", "guided_mask", "sampler_logprobs", "rewards")


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int, left: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Int32 tokens padded to [N, width] (on the left for prompts, the right for completions) and
    their 0/1 mask."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if left else slice(0, len(row))
        tokens[i, columns] = row
        mask[i, columns] = 1
    return tokens, mask


def to_batch(rollouts: Rollouts, pad_id: int) -> train_step_lib.RolloutBatch:
    """The train step's batch: prompts left-padded to a power-of-two width, completions as sampled."""
    width = sampling.bucket_length(max(len(p) for p in rollouts.prompts))
    prompt_tokens, prompt_mask = pad_rows(rollouts.prompts, width, pad_id)
    return train_step_lib.make_batch(
        prompt_tokens, prompt_mask, rollouts.tokens, rollouts.mask, rollouts.rewards,
        accuracy=rollouts.accuracy, guided_mask=rollouts.guided_mask, old_logprobs=rollouts.sampler_logprobs,
        problem_ids=rollouts.problem_ids, guided=rollouts.guided,
    )


# ----------------------------------------------------------------------------- guide lengths and the SFT baseline's batch


def guide_lengths(guidance_state, gcfg: ml_collections.ConfigDict, rows) -> list[int]:
    """ℓ for each prompt row: the problem's own with guidance.per_problem, else the global one."""
    if gcfg.mode == "none":
        return [0] * len(rows)
    lengths = guidance.row_lengths(guidance_state, np.asarray(rows, np.int32))
    return [int(n) for n in jax.device_get(lengths)]


def reference_batch(cfg, prepared, rows, tokenizer):
    """The SFT baseline's batch: each prompt's reference trajectory as its completion, ended by the
    stop token when it fits the budget (so the model learns to stop). No sampling, no rewards."""
    max_new = cfg.sampling.max_new_tokens
    pad_id = data.pad_token_id(tokenizer)
    stop_id = data.stop_token_ids(tokenizer)[0]
    prompts = [list(prepared.prompt_ids[r]) for r in rows]
    completions = [list(prepared.trajectory_ids[r])[:max_new] for r in rows]
    completions = [c + [stop_id] if len(c) < max_new else c for c in completions]
    completion_tokens, completion_mask = pad_rows(completions, max_new, pad_id, left=False)
    prompt_tokens, prompt_mask = pad_rows(prompts, sampling.bucket_length(max(map(len, prompts))), pad_id)
    batch = train_step_lib.make_batch(prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                                      np.zeros(len(rows), np.float32))
    info = dict(per_kind={}, stats={}, sample_s=0.0, reward_s=0.0, lengths=completion_mask.sum(axis=1))
    return batch, info


# ----------------------------------------------------------------------------- sampling options


def prompt_sharing(cfg: ml_collections.ConfigDict) -> tuple[bool, str]:
    """(whether the train step runs a group's prompt once, `make_train_step(..., shared_prompts=...)`;
    why, for the start-up log): step.shared_prompts, except for the SFT baseline and for guides
    placed in the prompt, whose rows in a group carry different prompts."""
    if not cfg.step.shared_prompts:
        return False, "step.shared_prompts=False"
    if cfg.step.loss_type == "sft":
        return False, "the SFT baseline's rows are different problems"
    if cfg.guidance.mode != "none" and cfg.guidance.placement == "prompt":
        return False, "guidance.placement='prompt' gives guided rows a prompt of their own"
    return True, "a group's rollouts share their prompt"


def shares_prompts(cfg: ml_collections.ConfigDict) -> bool:
    return prompt_sharing(cfg)[0]


def guide_budget_warning(gcfg: ml_collections.ConfigDict, scfg: ml_collections.ConfigDict) -> str | None:
    """A warning when the schedule's ℓ (in tokens) can exceed sampling.max_new_tokens, where every
    guide is capped: a rollout guided that far is entirely forced. None when it cannot."""
    if gcfg.mode == "none" or gcfg.length_unit != "tokens":
        return None
    key = "initial_length" if gcfg.mode == "fixed" else "max_length"
    if gcfg[key] <= scfg.max_new_tokens:
        return None
    return (f"guidance.{key}={gcfg[key]} is above sampling.max_new_tokens={scfg.max_new_tokens}: guides are capped "
            f"at {scfg.max_new_tokens} tokens, so a rollout guided at ℓ >= {scfg.max_new_tokens} is entirely forced "
            f"and the logged ℓ runs ahead of the tokens forced; lower guidance.{key} or raise sampling.max_new_tokens")


def positions_needed(prompt_ids: Sequence[Sequence[int]], gcfg: ml_collections.ConfigDict,
                     scfg: ml_collections.ConfigDict) -> tuple[int, str]:
    """(the most positions a rollout can take, how: longest prompt + hint + completion budget)."""
    longest = max(map(len, prompt_ids), default=0)
    hint = scfg.max_new_tokens if gcfg.mode != "none" and gcfg.placement == "prompt" else 0
    how = f"the longest prompt ({longest} tokens)"
    if hint:
        how += f" + a hint of up to sampling.max_new_tokens={hint} tokens (guidance.placement='prompt')"
    return longest + hint + scfg.max_new_tokens, how + f" + sampling.max_new_tokens={scfg.max_new_tokens}"


def validate_options(gcfg: ml_collections.ConfigDict, scfg: ml_collections.ConfigDict) -> None:
    """Checks the options above (the `guidance` and `sampling` sections); raises ValueError naming
    the key as it is typed, its bad value and the valid ones."""
    for key, valid in (("placement", PLACEMENTS), ("trigger", TRIGGERS), ("length_unit", LENGTH_UNITS)):
        if gcfg[key] not in valid:
            raise ValueError(f"guidance.{key}={gcfg[key]!r} is not valid; valid: {valid}")
    if gcfg.length_unit == "percent" and max(gcfg.max_length, gcfg.initial_length) > 100:
        raise ValueError(f"guidance.max_length={gcfg.max_length!r} and guidance.initial_length="
                         f"{gcfg.initial_length!r} must be at most 100 with guidance.length_unit='percent' (ℓ is a "
                         "percentage of the trajectory): restate min_length, initial_length, max_length and delta "
                         "in percent")
    if gcfg.length_unit == "steps" and not (isinstance(gcfg.step_delimiter, str) and gcfg.step_delimiter):
        raise ValueError(f"guidance.step_delimiter={gcfg.step_delimiter!r} is not valid with guidance."
                         "length_unit='steps'; valid: the non-empty text that ends a reasoning step, e.g. '\\n\\n'")
    rounds = scfg.refill_rounds
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise ValueError(f"sampling.refill_rounds={rounds!r} is not valid; valid: an integer >= 0 (0 = off)")
    chunk_rows = scfg.get("chunk_rows", 0)
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 0:
        raise ValueError(f"sampling.chunk_rows={chunk_rows!r} is not valid; valid: an integer >= 0 (0 = one "
                         "sampler call per round)")
    if scfg.dtype:
        models.resolve_dtype(scfg.dtype, "sampling.dtype")


class RolloutCollector:
    """Samples and scores a step's rollouts under the config's guidance and sampling options."""

    def __init__(self, cfg: ml_collections.ConfigDict, model_cfg, tokenizer, prepared: data.PreparedPrompts,
                 scorer: Callable, mesh=None, overlap_scoring: bool = False):
        """scorer(texts, examples) -> (total [N], per_kind {name: [N]}, stats {event: count}).
        overlap_scoring: the scorer may run in a helper thread while the next chunk samples (true
        for a reward pool; in-process math-verify needs the main thread for its timeouts)."""
        self.overlap_scoring = overlap_scoring
        self.group_size = int(cfg.step.group_size)
        self.temperature = float(cfg.step.temperature)
        self.scfg, self.gcfg = cfg.sampling, cfg.guidance
        self.sampler_dtype = cfg.sampling.dtype or None  # None: the sampler runs as the train step does
        self.sampler_cfg = (model_cfg.replace(dtype=self.sampler_dtype, param_dtype=self.sampler_dtype)
                            if self.sampler_dtype else model_cfg)
        self.tokenizer, self.prepared, self.scorer, self.mesh = tokenizer, prepared, scorer, mesh
        self.rules = tuple(cfg.mesh.rules) if "mesh" in cfg else sharding.DEFAULT_RULES
        self.pad_id = data.pad_token_id(tokenizer)
        self.chunk_rows = int(cfg.sampling.get("chunk_rows", 0))  # 0: a whole round per sampler call
        self.eos_ids = data.stop_token_ids(tokenizer)
        self._step_ends: dict[int, tuple[int, ...]] = {}  # problem row -> its trajectory's step ends
        self.reward_seconds, self.extra_rollouts = 0.0, 0  # of the current `collect`

    # -- guides

    def _trajectory(self, row: int) -> Sequence[int]:
        return self.prepared.trajectory_ids[row] if self.prepared.trajectory_ids else ()

    def guide(self, row: int, length: int) -> list[int]:
        """The guide of problem `row` at ℓ = `length` in the configured unit, within the budget."""
        trajectory = self._trajectory(row)
        step_ends = ()
        if self.gcfg.length_unit == "steps" and length > 0:
            if row not in self._step_ends:
                self._step_ends[row] = trajectory_step_ends(trajectory, self.tokenizer, self.gcfg.step_delimiter)
            step_ends = self._step_ends[row]
        count = guide_token_count(self.gcfg.length_unit, int(length), len(trajectory), step_ends)
        return [int(t) for t in trajectory[:min(count, self.scfg.max_new_tokens)]]

    # -- sampler calls

    def sample(self, params, problem_ids: Sequence[int], guides: Sequence[Sequence[int]], key) -> Rollouts:
        """N rollouts (problem row and guide ids per rollout), sampled in chunks of
        `sampling.chunk_rows`, decoded and scored; scoring overlaps sampling with a reward pool."""
        count = len(problem_ids)
        size = self.chunk_rows or count
        chunks = [range(start, min(start + size, count)) for start in range(0, count, size)]
        parts: list[Rollouts] = []
        pipelined(
            chunks,
            lambda rows: self._sample_chunk(params, [problem_ids[i] for i in rows], [guides[i] for i in rows],
                                            key, rows.start),
            lambda rows, sampled: self._score(*sampled),
            lambda rows, sampled, scored: parts.append(scored),
            overlap=self.overlap_scoring and len(chunks) > 1)
        return parts[0] if len(parts) == 1 else Rollouts.concat(parts)

    def _sample_chunk(self, params, problem_ids, guides, key, first_row: int):
        """One sampler call: (problem ids, guides, prompts, sampler output)."""
        prompts = [tuple(self.prepared.prompt_ids[r]) for r in problem_ids]
        forced = guides
        if self.gcfg.placement == "prompt":  # the hint joins the prompt; nothing is forced
            prompts = [p + tuple(g) for p, g in zip(prompts, guides)]
            forced = [[] for _ in guides]
        out = sampling.sample(
            self.sampler_cfg, params, prompts, forced, max_new_tokens=self.scfg.max_new_tokens,
            temperature=self.temperature, top_p=self.scfg.top_p, top_k=self.scfg.top_k, eos_ids=self.eos_ids,
            rng=key, pad_id=self.pad_id, mesh=self.mesh, score_guides=False,  # the train step recomputes them
            first_row=first_row, rules=self.rules,
        )
        return problem_ids, guides, prompts, out

    def _score(self, problem_ids, guides, prompts, out) -> Rollouts:
        """Decodes and scores one sampler call's rollouts (may run in `pipelined`'s helper thread)."""
        start = time.perf_counter()
        sequences = [out.tokens[i, : out.lengths[i]] for i in range(len(prompts))]
        if self.gcfg.placement == "prompt":  # rewards see the guide in both placements
            sequences = [np.concatenate([np.asarray(g, np.int32), s]) for g, s in zip(guides, sequences)]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        examples = [self.prepared.examples[r] for r in problem_ids]
        total, per_kind, stats = self.scorer(texts, examples)
        self.reward_seconds += time.perf_counter() - start
        return Rollouts(
            problem_ids=np.asarray(problem_ids, np.int32), prompts=list(prompts),
            guided=np.array([len(g) > 0 for g in guides], bool), tokens=out.tokens, mask=out.mask,
            guided_mask=out.guided_mask, sampler_logprobs=out.logprobs, texts=list(texts),
            rewards=np.asarray(total, np.float32), per_kind={k: np.asarray(v, np.float32) for k, v in per_kind.items()},
            stats=dict(stats))

    # -- one round: the trigger

    def _round(self, params, rows: Sequence[int], lengths: Sequence[int], key) -> Rollouts:
        """The G rollouts of each prompt in `rows`, guided as the trigger says (`lengths`: ℓ per row)."""
        assign_key, sample_key = jax.random.split(key)
        alpha = self.gcfg.alpha if max(lengths, default=0) > 0 else 0.0
        guided = np.asarray(guided_rollouts.assign_guided(assign_key, len(rows), self.group_size, alpha))
        problem_ids = np.repeat(np.asarray(rows, np.int32), self.group_size)
        group_guides = [self.guide(r, n) for r, n in zip(rows, lengths)]
        guides = [group_guides[i // self.group_size] if guided[i] else [] for i in range(len(problem_ids))]
        if self.gcfg.trigger == "always":
            return self.sample(params, problem_ids, guides, sample_key)
        unguided = self.sample(params, problem_ids, [[] for _ in guides], sample_key)
        failed = np.repeat(all_fail_groups(unguided.accuracy, self.group_size), self.group_size)
        redo = np.flatnonzero(failed & np.array([len(g) > 0 for g in guides]))
        self.extra_rollouts += len(redo)
        if not len(redo):
            return unguided
        again = self.sample(params, problem_ids[redo], [guides[i] for i in redo], jax.random.fold_in(sample_key, 1))
        return unguided.with_rows(redo, again)

    # -- a step

    def collect(self, params, rows: Sequence[int], lengths_of: Callable[[Sequence[int]], Sequence[int]], key,
                next_rows: Callable[[], Sequence[int]]) -> tuple[Rollouts, dict]:
        """The step's rollouts (len(rows) · G of them) and host info for the step's metrics:
        per_kind and stats of the rewards, completion lengths, sample_s and reward_s (seconds) and
        `metrics` ({'rollout/...': float} for the options that are on).

        lengths_of(rows) gives ℓ per prompt row (the global ℓ, or each problem's own);
        next_rows() draws the next batch of prompt rows (used by dynamic sampling only).
        """
        self.reward_seconds, self.extra_rollouts = 0.0, 0
        start = time.perf_counter()
        if self.sampler_dtype:
            params = jax.tree.map(lambda p: p.astype(self.sampler_dtype), params)
        rounds = [self._round(params, rows, lengths_of(rows), key)]
        metrics: dict = {}
        if self.scfg.refill_rounds:
            num_groups = len(rows)
            informative = informative_groups(rounds[0].accuracy, self.group_size)
            metrics["rollout/first_round_informative_share"] = float(informative.mean())
            while int(informative.sum()) < num_groups and len(rounds) <= self.scfg.refill_rounds:
                more_rows = next_rows()
                rounds.append(self._round(params, more_rows, lengths_of(more_rows),
                                          jax.random.fold_in(key, len(rounds))))
                informative = np.concatenate([informative, informative_groups(rounds[-1].accuracy, self.group_size)])
            keep = fill_order(informative, num_groups)
            rollouts = Rollouts.concat(rounds)
            rollouts = rollouts.take((keep[:, None] * self.group_size + np.arange(self.group_size)).reshape(-1))
            sampled = sum(len(r) for r in rounds)
            metrics.update({
                "rollout/sampling_rounds": float(len(rounds)),
                "rollout/kept_group_share": float(num_groups / (sampled // self.group_size)),
                "rollout/uninformative_groups_kept": float((~informative[keep]).sum()),
            })
            self.extra_rollouts += sampled - num_groups * self.group_size
        else:
            rollouts = rounds[0]
        if self.scfg.refill_rounds or self.gcfg.trigger != "always":
            metrics["rollout/extra_rollouts"] = float(self.extra_rollouts)
        elapsed = time.perf_counter() - start
        info = dict(per_kind=rollouts.per_kind, stats=rollouts.stats, lengths=rollouts.mask.sum(axis=1),
                    sample_s=elapsed - self.reward_seconds, reward_s=self.reward_seconds, metrics=metrics)
        return rollouts, info


# ----------------------------------------------------------------------------- sample while scoring

Chunk = TypeVar("Chunk")
Sampled = TypeVar("Sampled")
Scored = TypeVar("Scored")


def pipelined(chunks: Iterable[Chunk], sample_fn: Callable[[Chunk], Sampled],
              score_fn: Callable[[Chunk, Sampled], Scored], record_fn: Callable[[Chunk, Sampled, Scored], None],
              overlap: bool = True) -> None:
    """Samples every chunk, scores it and records the result, scoring chunk i while chunk i+1 samples.

    For each chunk in order: sampled = sample_fn(chunk), scored = score_fn(chunk, sampled), then
    record_fn(chunk, sampled, scored). With overlap, score_fn runs in one helper thread while the
    calling thread samples the next chunk (device work that releases the GIL overlaps host work),
    so at most two chunks are in flight; sample_fn and record_fn always run in the calling thread,
    and record_fn sees the chunks in their order, exactly as the sequential loop (overlap=False,
    everything in the calling thread) would. score_fn must then be safe to call from another
    thread: e.g. math-verify's signal-based timeouts need the main thread, a process pool does not.

    An exception from any of the three functions propagates to the caller; the helper thread is
    shut down first (a queued score is cancelled, a running one awaited), so none outlives the call.
    The chunks recorded by then are a prefix of the chunk order; with overlap, a failure while
    sampling chunk i+1 also leaves chunk i unrecorded.
    """
    if not overlap:
        for chunk in chunks:
            sampled = sample_fn(chunk)
            record_fn(chunk, sampled, score_fn(chunk, sampled))
        return
    scorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pipelined-score")
    pending = None  # (chunk, sampled, future of its score)
    try:
        for chunk in chunks:
            sampled = sample_fn(chunk)
            previous, pending = pending, (chunk, sampled, scorer.submit(score_fn, chunk, sampled))
            if previous is not None:
                record_fn(previous[0], previous[1], previous[2].result())
        if pending is not None:
            record_fn(pending[0], pending[1], pending[2].result())
    finally:
        scorer.shutdown(wait=True, cancel_futures=True)
