"""Rollout generation with forced-prefix (guided) decoding.

A row's completion is its guide tokens (forced; may be empty) followed by sampled tokens, within a
budget of `max_new_tokens` for both together. Guides are teacher-forced in the prefill: prompt and
guide are concatenated and left-padded, so every row ends at the same cache slot and the decode
loop advances all rows in lockstep.

Rows with a guide are prefilled apart from the unguided ones, which then cover only their own
(shorter) bucket: their cache slots in front stay empty instead of running the model over padding.
Rows with the same prompt + guide (the G rollouts of a group, or its guided rollouts, which share
one guide) are prefilled once and their cache is copied to each of them, so a group's prefill costs
one prompt plus one prompt + guide per distinct guide instead of G. (A guided row's prompt sits at
other cache slots than an unguided row's, because rows are left-padded to end together, so the
prompt is run again under the guide rather than shared.)

Decoding runs in a few phases, each one jitted `lax.while_loop` over the loop state (one pytree,
donated) that stops early once every row is finished. Between phases the KV cache grows (a step
reads the whole cache, so it should not carry empty slots); when at most half the rows are still
running, the finished ones are dropped so the rest decode in a smaller batch (guided rows and rows
that hit EOS early stop costing compute); and once the rows with the longest prompt + guide are
finished, the empty slots in front of the others leave the cache. Each row draws its noise from
its own key, so its sample does not depend on where it sits in the batch.

Tokens are drawn by inverse-CDF sampling (one uniform number per row) instead of Gumbel noise over
the whole vocabulary, which would dominate a decode step on CPU and cost ~5x more at Qwen3's 152k
vocabulary. Returned log-probs are log_softmax(logits / temperature) of each completion token over
the full vocabulary (what the GRPO loss recomputes), in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from g2rpo_jax import models
from g2rpo_jax import sharding as sharding_lib
from g2rpo_jax.models.config import ModelConfig


@dataclasses.dataclass
class SampleOutput:
    """Completions as host arrays [B, L] with L = max_new_tokens."""

    tokens: np.ndarray  # int32; guide tokens first, then sampled ones; pad after the end
    logprobs: np.ndarray  # float32; 0 where mask is 0
    mask: np.ndarray  # int32; 1 on completion tokens up to and including the first EOS
    guided_mask: np.ndarray  # int32; 1 exactly on forced guide tokens
    lengths: np.ndarray  # int32 [B]; number of completion tokens (sum of mask)


class _LoopState(flax.struct.PyTreeNode):
    cache: models.KVCache
    tokens: jax.Array  # [B, L]
    logprobs: jax.Array  # [B, L]
    lengths: jax.Array  # [B] completion tokens written so far (guide included)
    done: jax.Array  # [B]
    last_token: jax.Array  # [B] the token to feed next
    row_keys: jax.Array  # [B] PRNG key of each row
    step: jax.Array  # [] sampled tokens so far (the same for all rows)


def bucket_length(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (at least `minimum`): bounds the number of compiled programs."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


_DECODE_PHASES = 4  # decode loops per generation, each over a longer cache than the one before
_CDF_BLOCK = 128  # entries per block of the two-level inverse CDF


def decode_phase_ends(max_new_tokens: int, phases: int = _DECODE_PHASES) -> list[int]:
    """Numbers of sampled tokens at which decoding moves to a longer cache.

    A decode step reads the whole cache it attends over. With the cache grown in four phases, a
    step reads on average 5/8 of the generated part of a full-length cache; each phase is one more
    program to compile, so there are few.
    """
    return sorted({-(-max_new_tokens * j // phases) for j in range(1, phases + 1)})


def first_argmax(scores: jax.Array) -> jax.Array:
    """Index of the first maximum per row. [B, N] -> [B] int32.

    Two plain reductions; XLA's CPU argmax (a reduction carrying value and index) is ~8x slower
    at a 32k vocabulary.
    """
    best = jnp.max(scores, axis=-1, keepdims=True)
    positions = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(scores == best, positions, scores.shape[-1]), axis=-1)


def inverse_cdf_choice(scores: jax.Array, uniforms: jax.Array) -> jax.Array:
    """Index drawn from softmax(scores) per row using one uniform in [0, 1) per row. [B, N] -> [B].

    Two levels: pick the block of `_CDF_BLOCK` entries by the running sum of block masses, then
    the entry inside it. A cumulative sum over the whole vocabulary costs 7 ms per step on CPU at
    [64, 32000]; this costs under 1 ms. Zero-weight entries (masked by top-k/top-p) are never chosen.
    """
    batch, size = scores.shape
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    blocks = jnp.pad(weights, ((0, 0), (0, -size % _CDF_BLOCK))).reshape(batch, -1, _CDF_BLOCK)  # [B, C, b]
    block_mass = jnp.sum(blocks, axis=-1)  # [B, C]
    mass_through = jnp.cumsum(block_mass, axis=-1)  # [B, C]
    threshold = uniforms * mass_through[:, -1]
    # First block whose running mass exceeds the threshold (never a zero-mass block).
    block = jnp.minimum(jnp.sum(mass_through <= threshold[:, None], axis=-1), block_mass.shape[1] - 1)
    mass_before = jnp.take_along_axis(mass_through - block_mass, block[:, None], axis=1)[:, 0]
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [B, b]
    entry = jnp.sum(mass_before[:, None] + jnp.cumsum(inside, axis=-1) <= threshold[:, None], axis=-1)
    # Rounding can push the threshold past the block's last entry: stay on a positive-weight one.
    last_positive = jnp.max(jnp.where(inside > 0, jnp.arange(_CDF_BLOCK), 0), axis=-1)
    return (block * _CDF_BLOCK + jnp.minimum(entry, last_positive)).astype(jnp.int32)


def draw_tokens(logits: jax.Array, uniforms: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Samples one token per row from logits [B, V] with temperature, top-k and top-p (nucleus),
    using one uniform number in [0, 1) per row."""
    if top_k == 1:
        return first_argmax(logits)
    scores = logits / temperature
    candidates = None
    if top_k > 0 or top_p < 1.0:
        # Candidates sorted by score, best first: the top-k, or the whole vocabulary for top-p alone.
        scores, candidates = jax.lax.top_k(scores, top_k if top_k > 0 else scores.shape[-1])
    if top_p < 1.0:
        probs = jax.nn.softmax(scores, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        scores = jnp.where(mass_before < top_p, scores, -jnp.inf)  # the best token always stays
    choice = inverse_cdf_choice(scores, uniforms)
    if candidates is None:
        return choice
    return jnp.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _guide_logprobs(cfg, params, hidden, prefill_tokens, guide_lengths, window, max_new_tokens, temperature):
    """Log-probs of the forced guide tokens from the prefill's hidden states. -> [B, L].

    Guides sit at the right end of the prefill; only the last `window` positions are projected
    onto the vocabulary.
    """
    prefill_len = prefill_tokens.shape[1]
    # Hidden state at slot s predicts the token at slot s + 1.
    window_hidden = hidden[:, prefill_len - window - 1 : prefill_len - 1]  # [B, W, E]
    window_targets = prefill_tokens[:, prefill_len - window :]  # [B, W]
    window_logps = models.token_logprobs(cfg, params, window_hidden, window_targets, temperature)
    columns = jnp.arange(max_new_tokens)[None, :]
    # Guide token j of row i is at slot P - g_i + j, i.e. window index W - g_i + j.
    index = jnp.clip(window - guide_lengths[:, None] + columns, 0, window - 1)
    picked = jnp.take_along_axis(window_logps, index, axis=1)
    return jnp.where(columns < guide_lengths[:, None], picked, 0.0)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The static sampling settings of one `sample` call."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eos_ids: tuple[int, ...]

    def is_eos(self, tokens: jax.Array) -> jax.Array:
        return jnp.isin(tokens, jnp.asarray(self.eos_ids or (-1,), jnp.int32))


def _sample_and_write(state: _LoopState, logits: jax.Array, settings: _Settings, rows_sharding) -> _LoopState:
    """Draws each running row's next token from logits [B, V] and appends it with its log-prob.

    rows_sharding: with a mesh, the logits are laid out batch-sharded and whole along the
    vocabulary before drawing, because a cumulative sum along a vocabulary split over devices is
    partitioned very badly (measured 200x slower than gathering first).
    """
    if rows_sharding is not None:
        logits = jax.lax.with_sharding_constraint(logits, rows_sharding)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.row_keys, state.step)
    uniforms = jax.vmap(jax.random.uniform)(step_keys)
    token = draw_tokens(logits, uniforms, settings.temperature, settings.top_k, settings.top_p)  # [B]
    active = ~state.done
    write = active[:, None] & (jnp.arange(settings.max_new_tokens)[None, :] == state.lengths[:, None])  # [B, L]
    tokens = jnp.where(write, token[:, None], state.tokens)
    logprob = models.log_softmax_at(logits, token, settings.temperature)  # [B]
    logprobs = jnp.where(write, logprob[:, None], state.logprobs)
    lengths = state.lengths + active.astype(jnp.int32)
    done = state.done | (active & settings.is_eos(token)) | (lengths >= settings.max_new_tokens)
    return state.replace(tokens=tokens, logprobs=logprobs, lengths=lengths, done=done,
                         last_token=token, step=state.step + 1)


def _prefill_rows(cfg: ModelConfig, params, tokens, valid, cache_length: int, end_slot: int):
    """Prefills left-padded rows [B, T] into a fresh cache so that they end at `end_slot`."""
    cache = models.init_cache(cfg, tokens.shape[0], cache_length, start_slot=end_slot - tokens.shape[1])
    return models.extend_cache(cfg, params, tokens, valid, cache)


def _join_rows(first, second):
    """Two batch-major pytrees (such as KV caches) stacked along the batch; scalars are shared."""
    return jax.tree.map(lambda a, b: a if a.ndim == 0 else jnp.concatenate([a, b]), first, second)


def _take_rows(tree, rows: jax.Array, rows_sharding=None):
    """Rows `rows` [B] of every batch-major leaf of `tree` (scalars are shared), split over the batch
    axes of `rows_sharding` (the [B, ...] layout of the batch) when it is given."""
    def take(x):
        if x.ndim == 0:
            return x
        x = jnp.take(x, rows, axis=0)
        if rows_sharding is None:
            return x
        spec = jax.sharding.PartitionSpec(rows_sharding.spec[0], *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(rows_sharding.mesh, spec))

    return jax.tree.map(take, tree)


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "cache_length", "guide_window", "guided_rows",
                                             "unguided_len", "rows_sharding"))
def _prefill(cfg: ModelConfig, params, prefill_tokens, prefill_valid, prefill_guide_lengths, guide_tokens,
             guide_lengths, row_keys, row_source, *, settings: _Settings, cache_length: int, guide_window: int,
             guided_rows: int, unguided_len: int, rows_sharding=None) -> _LoopState:
    """Runs each distinct prompt + guide through the model, copies the results to the rows that
    share it, and samples every row's first token; returns the loop state.

    Distinct prefills (D rows): prefill_tokens/prefill_valid [D, P], prompt + guide, left-padded;
    prefill_guide_lengths [D]. Rows with a guide come first, within the first `guided_rows`. The
    rows after them fit in the last `unguided_len` columns and are prefilled over those only, so a
    guided batch does not run the model over the unguided rows' padding (their cache slots in front
    stay empty). The batch (B rows): guide_tokens [B, L], guide ids at the start of each row;
    guide_lengths [B]; row_keys [B]; row_source [B], the distinct prefill of each row, or None
    when D = B and row i is prefill i.
    """
    distinct, prefill_len = prefill_tokens.shape
    if 0 < guided_rows < distinct and unguided_len < prefill_len:
        first, rest = slice(0, guided_rows), slice(guided_rows, None)
        hidden, cache = _prefill_rows(cfg, params, prefill_tokens[first], prefill_valid[first], cache_length, prefill_len)
        rest_hidden, rest_cache = _prefill_rows(cfg, params, prefill_tokens[rest, -unguided_len:],
                                                prefill_valid[rest, -unguided_len:], cache_length, prefill_len)
        cache = _join_rows(cache, rest_cache)
        last_hidden = jnp.concatenate([hidden[:, -1], rest_hidden[:, -1]])
    else:
        hidden, cache = _prefill_rows(cfg, params, prefill_tokens, prefill_valid, cache_length, prefill_len)
        last_hidden = hidden[:, -1]
    first_logits = models.logits_from_hidden(cfg, params, last_hidden)  # [D, V]
    if guide_window:
        first = slice(0, guided_rows)
        guide_logps = _guide_logprobs(cfg, params, hidden[first], prefill_tokens[first], prefill_guide_lengths[first],
                                      guide_window, settings.max_new_tokens, settings.temperature)
        guide_logps = jnp.pad(guide_logps, ((0, distinct - guided_rows), (0, 0)))
    else:
        guide_logps = jnp.zeros((distinct, settings.max_new_tokens), jnp.float32)
    if row_source is not None:
        cache, first_logits, guide_logps = _take_rows((cache, first_logits, guide_logps), row_source, rows_sharding)
    batch = guide_tokens.shape[0]
    in_guide = jnp.arange(settings.max_new_tokens)[None, :] < guide_lengths[:, None]
    guide_has_eos = jnp.any(in_guide & settings.is_eos(guide_tokens), axis=1)
    start = _LoopState(
        cache=cache,
        tokens=guide_tokens,
        logprobs=guide_logps,
        lengths=guide_lengths,
        done=(guide_lengths >= settings.max_new_tokens) | guide_has_eos,
        last_token=jnp.zeros((batch,), jnp.int32),
        row_keys=row_keys,
        step=jnp.zeros((), jnp.int32),
    )
    # The first token comes from the prefill logits; each decode iteration then runs exactly one
    # forward whose logits are used, so no step is wasted.
    return _sample_and_write(start, first_logits, settings, rows_sharding)


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "rows_sharding"), donate_argnames=("state",))
def _decode(cfg: ModelConfig, params, state: _LoopState, *, settings: _Settings, rows_sharding=None) -> _LoopState:
    """Decodes until the cache is full or every row is done."""
    batch, cache_length = state.done.shape[0], state.cache.length

    def decode_step(state: _LoopState) -> _LoopState:
        hidden, cache = models.extend_cache(
            cfg, params, state.last_token[:, None], jnp.ones((batch, 1), bool), state.cache
        )
        logits = models.logits_from_hidden(cfg, params, hidden[:, 0])
        return _sample_and_write(state.replace(cache=cache), logits, settings, rows_sharding)

    def keep_going(state: _LoopState):
        return (state.cache.index < cache_length) & ~jnp.all(state.done)

    return jax.lax.while_loop(keep_going, decode_step, state)


@functools.partial(jax.jit, static_argnames=("cache_length", "drop_slots", "mesh", "rules"))
def _resize(state: _LoopState, rows: Optional[jax.Array], *, cache_length: int, drop_slots: int = 0,
            mesh=None, rules=sharding_lib.DEFAULT_RULES) -> _LoopState:
    """The loop state of the given rows only (all rows when `rows` is None), its cache without the
    first `drop_slots` slots and with room for `cache_length`. Every array leaf is batch-major."""
    cache = models.drop_leading_slots(state.cache, drop_slots)
    state = state.replace(cache=models.grow_cache(cache, cache_length))
    if rows is None:
        return state
    return _take_rows(state, rows, None if mesh is None else sharding_lib.batch_sharding(mesh, 2, rules))


def batch_sizes(largest: int, multiple: int) -> list[int]:
    """The batch sizes a generation may shrink to: `multiple` (so the mesh still divides them) times
    a power of two or 1.5 times one, up to `largest`. Two sizes per octave bound the number of
    compiled programs, and let a batch whose guided rows (a quarter, say) finished go on at 3/4."""
    sizes, base = set(), multiple
    while base <= largest:
        sizes.update(size for size in (base, base * 3 // 2) if size <= largest and size % multiple == 0)
        base *= 2
    return sorted(sizes | {largest})


def _smaller_batch(done: np.ndarray, multiple: int) -> int:
    """The batch size to continue with: the smallest of `batch_sizes` that holds the running rows."""
    running = int((~done).sum())
    return next(size for size in batch_sizes(done.shape[0], multiple) if size >= running)


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_token_ids(name: str, ids: Sequence[int], vocab_size: int) -> None:
    # An id outside the vocabulary would be clamped silently by the embedding gather (or, as an
    # EOS id, never be met).
    array = np.asarray(ids)
    if array.dtype.kind in "iu" and (array.size == 0 or (array.min() >= 0 and array.max() < vocab_size)):
        return  # the usual case, checked without a Python loop over every token
    bad = next((t for t in ids if not (_is_integer(t) and 0 <= t < vocab_size)), None)
    if bad is not None:
        raise ValueError(f"{name} holds token id {bad!r}; valid: integers in [0, vocab_size={vocab_size})")


def _check_arguments(prompts, guides, max_new_tokens, temperature, top_p, top_k, eos_ids, pad_id, vocab_size):
    if not prompts:
        raise ValueError("prompts is empty; pass at least one list of token ids")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        _check_token_ids(f"prompts[{i}]", prompt, vocab_size)
    if not _is_integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is not valid; valid: an integer >= 1")
    if len(guides) != len(prompts):
        raise ValueError(f"guides has {len(guides)} entries but prompts has {len(prompts)}; pass one (possibly empty) per prompt")
    for i, guide in enumerate(guides):
        if len(guide) > max_new_tokens:
            raise ValueError(
                f"guides[{i}] has {len(guide)} tokens but max_new_tokens={max_new_tokens}; "
                "the guide counts towards the completion budget, so cap it or raise max_new_tokens"
            )
        _check_token_ids(f"guides[{i}]", guide, vocab_size)
    if not (isinstance(temperature, (int, float, np.number)) and np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be > 0 and finite (use top_k=1 for greedy decoding)")
    if not (isinstance(top_p, (int, float, np.number)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} is not valid; valid: a number in (0, 1]")
    if not _is_integer(top_k) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} is not valid; valid: an integer >= 0 (0 disables top-k, 1 is greedy)")
    _check_token_ids("eos_ids", list(eos_ids), vocab_size)
    _check_token_ids("pad_id", [pad_id], vocab_size)


def _prefill_arrays(prompts, guides, padded_batch: int, max_new_tokens: int, pad_id: int):
    """Host arrays of the batch: prompt + guide left-padded to a bucketed length [B, P] with its
    validity mask, guide tokens [B, L], guide lengths [B] and prompt + guide lengths [B]."""
    prefix_lengths = np.ones(padded_batch, np.int32)
    prefix_lengths[: len(prompts)] = [len(p) + len(g) for p, g in zip(prompts, guides)]
    prefill_len = bucket_length(prefix_lengths.max())
    prefill = np.full((padded_batch, prefill_len), pad_id, np.int32)
    valid = np.arange(prefill_len)[None, :] >= prefill_len - prefix_lengths[:, None]
    guide_tokens = np.full((padded_batch, max_new_tokens), pad_id, np.int32)
    # Filler rows: a one-token prompt whose "guide" already fills the budget, so they never decode.
    guide_lengths = np.full((padded_batch,), max_new_tokens, np.int32)
    for i, (prompt, guide) in enumerate(zip(prompts, guides)):
        prefill[i, prefill_len - prefix_lengths[i]:] = list(prompt) + list(guide)
        guide_tokens[i, : len(guide)] = guide
        guide_lengths[i] = len(guide)
    return prefill, valid, guide_tokens, guide_lengths, prefix_lengths


def distinct_prefills(prefill: np.ndarray, guide_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with the same prefill tokens [B, P] and guide length [B] share one prefill.

    Returns (representatives [D], the first row of each distinct prefill, in order of appearance;
    source [B], the index into representatives of each row's prefill).
    """
    keyed = np.concatenate([prefill, guide_lengths[:, None]], axis=1)
    _, first, inverse = np.unique(keyed, axis=0, return_index=True, return_inverse=True)
    appearance = np.argsort(first)
    rank = np.empty_like(appearance)
    rank[appearance] = np.arange(len(appearance))
    return first[appearance], rank[np.ravel(inverse)].astype(np.int32)


def _prefill_layout(prefill, guide_lengths, prefix_lengths, num_guided: int, multiple: int):
    """Which rows the prefill runs (the batch is sorted guided rows first): (representatives [D],
    the batch row of each prefilled row; row_source [B], the prefilled row of each batch row, or
    None when every row is prefilled itself; guided_rows, the leading prefilled rows that carry a
    guide, bucketed; unguided_len, the bucketed prompt length the rows after them are run over).
    D is bucketed like the batch; its extra rows repeat the last one and no row reads them."""
    padded_batch, prefill_len = prefill.shape
    representatives, row_source = distinct_prefills(prefill, guide_lengths)
    distinct = min(padded_batch, round_up(bucket_length(len(representatives), 1), multiple))
    if distinct == padded_batch:
        representatives, row_source = np.arange(padded_batch), None
    guided = int(np.sum(representatives < num_guided))
    representatives = np.concatenate(
        [representatives, np.full(distinct - len(representatives), representatives[-1])])
    guided_rows = min(distinct, round_up(bucket_length(guided, 1), multiple)) if guided else 0
    # The rows after the guided ones are prefilled over their own (shorter) bucket.
    unguided_len = (bucket_length(prefix_lengths[representatives[guided_rows:]].max()) if guided_rows < distinct
                    else prefill_len)
    return representatives, row_source, guided_rows, unguided_len


# Long because the phased decode's host-side bookkeeping (which batch row each state row holds, the
# cache slots in front, the rows still running) stays in one place; its pieces are the jitted helpers above.
def sample(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    guides: Optional[Sequence[Sequence[int]]] = None,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_ids: Sequence[int] = (),
    rng: Optional[jax.Array] = None,
    pad_id: int = 0,
    mesh=None,
    batch_multiple: int = 8,
    score_guides: bool = True,
    first_row: int = 0,
    rules=sharding_lib.DEFAULT_RULES,
) -> SampleOutput:
    """Generates one completion per prompt; guides[i] (token ids, may be empty) is forced first.

    score_guides=False leaves the log-probs of guide tokens at 0 and skips their projection onto
    the vocabulary, for callers that recompute log-probs anyway (the train step does).
    Row i's noise comes from fold_in(rng, first_row + i): a caller that samples a batch in chunks
    passes each chunk's first row and gets the same noise per row as one call would give.
    With a mesh, rows are sharded over the mesh axes that `rules` (logical -> mesh axes, the
    config's `mesh.rules`) gives the logical 'batch' axis.
    Shapes are bucketed (batch to a multiple of `batch_multiple` and of the mesh's batch axes,
    prompt + guide length and guide window to powers of two), so a run compiles few programs.
    """
    guides = [list(g) for g in guides] if guides is not None else [[] for _ in prompts]
    _check_arguments(prompts, guides, max_new_tokens, temperature, top_p, top_k, eos_ids, pad_id, cfg.vocab_size)
    top_k = min(int(top_k), cfg.vocab_size)  # like transformers: a k beyond the vocabulary keeps every token
    rng = jax.random.key(0) if rng is None else rng
    batch = len(prompts)
    multiple = batch_multiple
    if mesh is not None:
        rules = tuple(rules)
        multiple = np.lcm(multiple, sharding_lib.batch_axis_size(mesh, rules))
    padded_batch = round_up(batch, multiple)
    # Guided rows go first, so the guide log-probs' vocabulary projection covers only them.
    order = sorted(range(batch), key=lambda i: not guides[i])
    batch_prompts, batch_guides = [prompts[i] for i in order], [guides[i] for i in order]
    num_guided = sum(1 for g in guides if g)
    prefill, valid, guide_tokens, guide_lengths, prefix_lengths = _prefill_arrays(
        batch_prompts, batch_guides, padded_batch, max_new_tokens, pad_id)
    prefill_len = prefill.shape[1]
    representatives, row_source, guided_rows, unguided_len = _prefill_layout(
        prefill, guide_lengths, prefix_lengths, num_guided, multiple)
    longest_guide = max(len(g) for g in guides)
    window = min(bucket_length(longest_guide, 1), prefill_len - 1) if longest_guide and score_guides else 0

    settings = _Settings(max_new_tokens, float(temperature), int(top_k), float(top_p), tuple(int(e) for e in eos_ids))
    # A row's noise comes from its index in `prompts`, wherever it sits in the batch.
    row_ids = first_row + np.concatenate([order, np.arange(batch, padded_batch)]).astype(np.int32)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.asarray(row_ids))
    arrays = (prefill[representatives], valid[representatives], guide_lengths[representatives], guide_tokens,
              guide_lengths, row_keys)
    rows_sharding = None
    if mesh is not None:
        arrays = tuple(jax.device_put(a, sharding_lib.batch_sharding(mesh, a.ndim, rules)) for a in arrays)
        rows_sharding = sharding_lib.batch_sharding(mesh, 2, rules)
    arrays += (None if row_source is None else jnp.asarray(row_source),)

    phase_ends = decode_phase_ends(max_new_tokens)
    # Sampled token s is fed back into cache slot prefix_slots + s - 1, so a phase that ends after
    # `end` sampled tokens needs prefix_slots + end - 1 slots.
    prefix_slots = prefill_len
    state = _prefill(cfg, params, *arrays, settings=settings, cache_length=prefix_slots + phase_ends[0] - 1,
                     guide_window=window, guided_rows=guided_rows, unguided_len=unguided_len,
                     rows_sharding=rows_sharding)
    tokens = np.zeros((padded_batch, max_new_tokens), np.int32)
    logprobs = np.zeros((padded_batch, max_new_tokens), np.float32)
    lengths = np.zeros((padded_batch,), np.int32)
    state_rows = np.arange(padded_batch)  # the batch row held by each row of the loop state

    def collect(state: _LoopState):
        tokens[state_rows], logprobs[state_rows], lengths[state_rows] = jax.device_get(
            (state.tokens, state.logprobs, state.lengths))

    for end in phase_ends:
        done = np.asarray(state.done)
        if done.all():
            break
        keep = None
        size = _smaller_batch(done, multiple)
        if size < done.shape[0]:
            collect(state)  # the finished rows are final now
            keep = np.concatenate([np.flatnonzero(~done), np.flatnonzero(done)])[:size]
            state_rows, done = state_rows[keep], done[keep]
            keep = jnp.asarray(keep)
        # Once the rows with the longest prompt + guide are finished, the padding in front of the
        # others leaves the cache (in power-of-two steps, which bounds the compiled programs).
        drop = prefix_slots - bucket_length(prefix_lengths[state_rows[~done]].max())
        prefix_slots -= drop
        cache_length = prefix_slots + end - 1
        if keep is not None or drop or cache_length > state.cache.length:
            state = _resize(state, keep, cache_length=cache_length, drop_slots=drop, mesh=mesh,
                            rules=tuple(rules))
        state = _decode(cfg, params, state, settings=settings, rows_sharding=rows_sharding)
    collect(state)
    back = np.argsort(order)  # batch position of each input row
    return _finish(tokens[back], logprobs[back], lengths[back], guide_lengths[back], settings.eos_ids, pad_id)


def _finish(tokens, logprobs, lengths, guide_lengths, eos_ids, pad_id) -> SampleOutput:
    """Masks everything after each row's first EOS (host side)."""
    columns = np.arange(tokens.shape[1])[None, :]
    eos_seen = np.isin(tokens, eos_ids) & (columns < lengths[:, None])
    first_eos = np.where(eos_seen.any(axis=1), eos_seen.argmax(axis=1) + 1, tokens.shape[1])
    mask = columns < np.minimum(lengths, first_eos)[:, None]
    guided_mask = mask & (columns < guide_lengths[:, None])
    return SampleOutput(
        tokens=np.where(mask, tokens, pad_id).astype(np.int32),
        logprobs=np.where(mask, logprobs, 0.0).astype(np.float32),
        mask=mask.astype(np.int32),
        guided_mask=guided_mask.astype(np.int32),
        lengths=mask.sum(axis=1).astype(np.int32),
    )
