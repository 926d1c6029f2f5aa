"""The decoder of Qwen3, Qwen2 / Qwen2.5 and Llama 3 in Flax Linen, with an explicit KV cache so
prefill and decode are pure functions.

One module serves every family; the config's family flags (`qk_norm`, `qkv_bias`, `o_proj_bias`,
`mlp_bias`) and `rope_scaling` select what differs (see `families`). Callers never branch on the
family.

Every parameter declares its logical axes once, where it is created; `g2rpo_jax.sharding` maps
those names onto mesh axes. The module returns final hidden states; the LM head is applied by
`logits_from_hidden` so callers can choose which positions need a vocabulary projection.

Attention masks are built from *slots* (column index in the sequence or cache) and a validity
mask, while rotary positions come from counting valid tokens; this is what makes left-padded
batches behave exactly like unpadded rows.
"""

from __future__ import annotations

from typing import Optional

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from g2rpo_jax.models.config import ModelConfig, resolve_dtype
from g2rpo_jax.models.rope import apply_rope, inverse_frequencies, rope_tables

# A large finite negative instead of -inf: a fully masked row (a padding query) then gets a
# harmless uniform distribution instead of NaNs.
_MASKED_SCORE = -1e30
_INIT = nn.initializers.normal(stddev=0.02)


class KVCache(flax.struct.PyTreeNode):
    """Keys/values of every layer plus the bookkeeping needed to extend them."""

    # One buffer per layer (not one stacked array) so each layer's update is in place inside a
    # decode loop instead of rewriting the whole cache every step.
    # Layouts chosen so both attention matmuls of a decode step read the cache in place: keys
    # are stored transposed. With [B, S, K, D] XLA copied the whole cache every step (8x slower).
    k: tuple[jax.Array, ...]  # L x [B, K, D, S]
    v: tuple[jax.Array, ...]  # L x [B, K, S, D]
    valid: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
    next_position: jax.Array  # [B] int32: rotary position of each row's next token
    index: jax.Array  # [] int32: next slot to write (shared: rows are left-padded to end together)

    @property
    def length(self) -> int:
        return self.k[0].shape[3]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None, start_slot: int = 0) -> KVCache:
    """An empty cache of `length` slots; the first `extend_cache` writes from `start_slot` on, and the
    slots before it stay empty (rows prefilled with a shorter chunk than others then still end at
    the same slot)."""
    dtype = resolve_dtype(dtype or cfg.dtype)
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, length)
    v_shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)),
        valid=jnp.zeros((batch, length), bool),
        next_position=jnp.zeros((batch,), jnp.int32),
        index=jnp.full((), start_slot, jnp.int32),
    )


def grow_cache(cache: KVCache, length: int) -> KVCache:
    """The same cache with room for `length` slots; the added slots are empty.

    Decode loops attend over the whole cache they carry, so a generation starts with a short cache
    and grows it between loops instead of reading a long, mostly empty one every step.
    """
    extra = length - cache.length
    if extra < 0:
        raise ValueError(f"cannot shrink a cache of {cache.length} slots to {length}")
    if extra == 0:
        return cache

    def pad_slots(x: jax.Array, axis: int) -> jax.Array:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    return cache.replace(
        k=tuple(pad_slots(k, 3) for k in cache.k),
        v=tuple(pad_slots(v, 2) for v in cache.v),
        valid=pad_slots(cache.valid, 1),
    )


def drop_leading_slots(cache: KVCache, count: int) -> KVCache:
    """The cache without its first `count` slots, which must be empty for every row still decoding
    (padding in front of the shortest prompts). Attention masks are built from slots and rotary
    positions are kept per row, so the remaining slots attend exactly as before."""
    if not 0 <= count <= cache.length:
        raise ValueError(f"cannot drop {count} slots of a cache of {cache.length}")
    if count == 0:
        return cache
    return cache.replace(
        k=tuple(k[..., count:] for k in cache.k),
        v=tuple(v[:, :, count:] for v in cache.v),
        valid=cache.valid[:, count:],
        index=cache.index - count,
    )


class RMSNorm(nn.Module):
    eps: float
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Same rounding order as the reference: normalise in f32, cast, then scale.
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def _dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str, bias: bool = False):
    """A projection [..., E] -> [..., features] applied to the inputs flattened to 2-D.

    Flat, each weight gradient is one [rows, E]ᵀ × [rows, F] matmul. Over [B, T, E] inputs it
    contracts two axes, and XLA:CPU then writes the incoming gradient transposed first: the MLP's
    forward and backward took 1.4× as long (experiments/benchmarks/NOTES.md)."""
    layer = nn.Dense(
        features,
        use_bias=bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        kernel_init=nn.with_logical_partitioning(_INIT, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )
    return lambda x: layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B, T, H, D], k [B, K, D, S], v [B, K, S, D], mask [B, T, S] -> [B, T, H, D]."""
    batch, steps, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if steps == 1:
        return _attend_one_query(q, k, v, mask)
    q = q.reshape(batch, steps, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    scores = jnp.einsum("bkgtd,bkds->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)  # this output layout keeps v un-transposed
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, steps, heads, head_dim)


def _attend_one_query(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attend` for a decode step (T = 1), as multiply-and-reduce instead of batched matmuls.

    A decode step is bound by reading the cache: XLA's CPU code for thousands of tiny per-head
    matmuls reads it at about half the memory bandwidth, a fused multiply-reduce at nearly all of it.
    """
    batch, _, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim, 1).astype(jnp.float32)  # [B, K, G, D, 1]
    scores = jnp.sum(q * k[:, :, None], axis=3) * head_dim**-0.5  # [B, K, G, S]
    scores = jnp.where(mask[:, :, None, :], scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[..., None] * v[:, :, None], axis=3)  # [B, K, G, D]
    return out.reshape(batch, 1, heads, head_dim).astype(v.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, sin, cos, mask, cached_kv=None, write_index=None):
        cfg = self.cfg
        batch, steps, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        q = _dense(cfg, heads * head_dim, ("embed", "q_heads"), "q_proj", bias)(x)
        k = _dense(cfg, kv_heads * head_dim, ("embed", "kv_heads"), "k_proj", bias)(x)
        v = _dense(cfg, kv_heads * head_dim, ("embed", "kv_heads"), "v_proj", bias)(x)
        q = q.reshape(batch, steps, heads, head_dim)
        k = k.reshape(batch, steps, kv_heads, head_dim)
        v = v.reshape(batch, steps, kv_heads, head_dim)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector before the rotation
            q = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype, name="k_norm")(k)
        q = apply_rope(q, sin, cos)
        k = apply_rope(k, sin, cos).transpose(0, 2, 3, 1)  # [B, K, D, T]
        v = v.transpose(0, 2, 1, 3)  # [B, K, T, D]
        if cached_kv is not None:
            cache_k, cache_v = cached_kv
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, 0, 0, write_index))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, 0, write_index, 0))
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        o_proj = _dense(cfg, cfg.hidden_size, ("q_heads", "embed"), "o_proj", cfg.o_proj_bias)
        out = o_proj(out.reshape(batch, steps, -1))
        return out, (k, v)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        bias = cfg.mlp_bias
        gate = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate_proj", bias)(x)
        up = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up_proj", bias)(x)
        return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj", bias)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, sin, cos, mask, cached_kv=None, write_index=None):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype, name=name)  # noqa: E731
        attn_out, kv = Attention(cfg, name="self_attn")(norm("input_layernorm")(x), sin, cos, mask, cached_kv, write_index)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        return x, kv


class DecoderModel(nn.Module):
    """Embeddings, decoder stack and final norm. Returns hidden states [B, T, E] and per-layer (k, v)."""

    cfg: ModelConfig
    remat: bool = False
    # Layout of the embedded tokens [B, T, E] (e.g. batch-sharded), or None to let XLA choose.
    # Without it the gather's output takes the embedding table's hidden-axis sharding (FSDP), and
    # every layer then holds parts of whole-batch tensors.
    activation_sharding: Optional[jax.sharding.Sharding] = None

    @nn.compact
    def __call__(self, tokens, positions, mask, cache_k=None, cache_v=None, write_index=None):
        cfg = self.cfg
        embed = self.param(
            "embedding",
            nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size),
            cfg.weight_dtype,
        )
        if not cfg.tie_word_embeddings:
            # Declared here so the parameter tree always carries the head it uses.
            self.param(
                "lm_head",
                nn.with_logical_partitioning(_INIT, ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size),
                cfg.weight_dtype,
            )
        x = jnp.take(embed, tokens, axis=0).astype(cfg.compute_dtype)  # [B, T, E]
        if self.activation_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, self.activation_sharding)
        sin, cos = rope_tables(positions, inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        new_k, new_v = [], []
        for i in range(cfg.num_layers):
            cached = None if cache_k is None else (cache_k[i], cache_v[i])
            with jax.named_scope(f"layer_{i}"):
                x, (k, v) = layer_cls(cfg, name=f"layers_{i}")(x, sin, cos, mask, cached, write_index)
            new_k.append(k)
            new_v.append(v)
        x = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype, name="norm")(x)
        return x, (tuple(new_k), tuple(new_v))


def lm_head_weight(cfg: ModelConfig, params) -> jax.Array:
    """The [E, V] output projection (the transposed embedding for tied models)."""
    if cfg.tie_word_embeddings:
        return params["embedding"].T
    return params["lm_head"]


def logits_from_hidden(cfg: ModelConfig, params, hidden: jax.Array) -> jax.Array:
    """[..., E] hidden states -> [..., V] logits in float32."""
    weight = lm_head_weight(cfg, params).astype(cfg.compute_dtype)
    return jnp.einsum("...e,ev->...v", hidden.astype(cfg.compute_dtype), weight, preferred_element_type=jnp.float32)


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Random parameters (unboxed arrays), for tests and from-scratch runs."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = DecoderModel(cfg).init(rng, tokens, tokens, jnp.ones((1, 1, 1), bool))["params"]
    return nn.meta.unbox(boxed)


def param_logical_axes(cfg: ModelConfig):
    """A pytree like the params whose leaves are PartitionSpecs of logical axis names."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda: DecoderModel(cfg).init(jax.random.key(0), tokens, tokens, jnp.ones((1, 1, 1), bool))["params"]
    )
    return nn.get_partition_spec(shapes)


def causal_mask(query_slots: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, T, S] mask: key slot s is visible from query slot t when s <= t and s holds a real token."""
    key_slots = jnp.arange(valid.shape[1])
    return (key_slots[None, :] <= query_slots[:, None])[None] & valid[:, None, :]


def positions_from_mask(valid: jax.Array, start: Optional[jax.Array] = None) -> jax.Array:
    """Rotary positions of a (left-)padded batch: count of real tokens before each slot. [B, T]."""
    counts = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
    if start is not None:
        counts = counts + start[:, None]
    return jnp.maximum(counts, 0)


def hidden_states(cfg: ModelConfig, params, tokens, valid=None, remat: bool = False,
                  activation_sharding: Optional[jax.sharding.Sharding] = None) -> jax.Array:
    """Final hidden states [B, T, E] for a (possibly left-padded) batch without a cache.
    `activation_sharding`: the layout of the [B, T, E] activations (see `DecoderModel`)."""
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    mask = causal_mask(jnp.arange(tokens.shape[1]), valid)
    model = DecoderModel(cfg, remat=remat, activation_sharding=activation_sharding)
    hidden, _ = model.apply({"params": params}, tokens, positions_from_mask(valid), mask)
    return hidden


def forward(cfg: ModelConfig, params, tokens: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """Logits [B, T, V] (float32) for int32 tokens [B, T]; `valid` marks real tokens of padded rows."""
    chex.assert_rank(tokens, 2)
    return logits_from_hidden(cfg, params, hidden_states(cfg, params, tokens, valid))


def extend_cache(cfg: ModelConfig, params, tokens: jax.Array, valid: jax.Array, cache: KVCache, *,
                 remat: bool = False, activation_sharding: Optional[jax.sharding.Sharding] = None):
    """Appends a chunk of tokens [B, T] to the cache; returns (hidden [B, T, E], new cache).

    Prefill is one call with the whole left-padded prompt; decoding is one call per step with T=1.
    `remat` and `activation_sharding` as in `DecoderModel` (for differentiated calls).
    """
    chex.assert_equal_shape([tokens, valid])
    steps = tokens.shape[1]
    all_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
    positions = positions_from_mask(valid, cache.next_position)
    mask = causal_mask(cache.index + jnp.arange(steps), all_valid)
    model = DecoderModel(cfg, remat=remat, activation_sharding=activation_sharding)
    hidden, (k, v) = model.apply({"params": params}, tokens, positions, mask, cache.k, cache.v, cache.index)
    new_cache = KVCache(
        k=k,
        v=v,
        valid=all_valid,
        next_position=cache.next_position + valid.sum(axis=1, dtype=jnp.int32),
        index=cache.index + steps,
    )
    return hidden, new_cache


def shared_prompt_hidden_states(cfg: ModelConfig, params, prompt_tokens: jax.Array, prompt_valid: jax.Array,
                                tokens: jax.Array, valid: jax.Array, *, remat: bool = False,
                                activation_sharding: Optional[jax.sharding.Sharding] = None):
    """Hidden states of N prompts and of G continuations of each, running every prompt once.

    prompt_tokens / prompt_valid [N, P] (left-padded); tokens / valid [N·G, T], rows n·G … n·G + G − 1
    continuing prompt n. Returns (prompt hidden [N, P, E], continuation hidden [N·G, T, E]), the
    same values as `hidden_states` over each row's prompt + continuation (up to matmul rounding):
    the prompts fill a cache, which is copied to their G rows before the continuations attend to it.
    A group's rollouts share their prompt, so the train step's forward and backward over the prompt
    cost ÷ G; gradients flow through the copies into the one prompt forward.
    """
    chex.assert_equal_shape([prompt_tokens, prompt_valid])
    chex.assert_equal_shape([tokens, valid])
    num_prompts, prompt_width = prompt_tokens.shape
    rows, width = tokens.shape
    if rows % num_prompts:
        raise ValueError(f"{rows} continuation rows do not split into equal groups for {num_prompts} prompts")
    group = rows // num_prompts
    options = dict(remat=remat, activation_sharding=activation_sharding)
    cache = init_cache(cfg, num_prompts, prompt_width + width)
    prompt_hidden, cache = extend_cache(cfg, params, prompt_tokens, prompt_valid, cache, **options)
    per_row = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, group, axis=0), cache)
    hidden, _ = extend_cache(cfg, params, tokens, valid, per_row, **options)
    return prompt_hidden, hidden
