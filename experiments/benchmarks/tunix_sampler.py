"""Times Google Tunix's sampler on a Qwen3 checkpoint; a worker process for `sampler.py`.

Runs inside the Tunix venv (`.venv-tunix`, built from requirements-tunix.txt), never in the
project's own venv: Tunix needs `safetensors<0.8`. It does not import the project.

    .venv-tunix/bin/python experiments/benchmarks/tunix_sampler.py --checkpoint DIR \
        --prompts prompts.npy --new-tokens 128 [--dtype float32]

The worker builds Tunix's Qwen3 (`tunix.models.qwen3`) from the HF checkpoint's config.json and
safetensors, wraps it in `tunix.generate.sampler.Sampler`, and runs one warm-up call (which
compiles the prefill and decode programs). It then answers on stdout, one JSON object per line
prefixed with `TUNIX `:
  - at start:     {"event": "ready", "version", "device", "warmup_s", "rows", "new_tokens"}
  - per `run` read on stdin: {"event": "run", "seconds"}: wall time of one sampler call, from the
    token ids in to the generated token ids back on the host (each row checked to hold exactly
    `--new-tokens` tokens);
  - `quit` (or end of input) ends the worker.
Sampling matches the other side of the benchmark: temperature 1 over the full distribution
(top_p=1, no top-k: Tunix then draws with `jax.random.categorical`), no EOS (the end-of-sequence
id is one outside the vocabulary, so no row stops early), no log-probs requested, a fixed seed.
Tunix's sampler takes text; the stand-in tokenizer here turns a row of ids into text and back by
joining and splitting digits, and detokenises to an empty string, so the timed call is the
sampler's work and almost nothing else.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time


def emit(**fields) -> None:
    print("TUNIX " + json.dumps(fields), flush=True)


class IdTokenizer:
    """The methods Tunix's TokenizerAdapter asks of a custom tokenizer, over space-separated ids.

    `pad_id` and `eos_id` sit outside the vocabulary: no prompt or sampled token equals them, so
    Tunix masks nothing it should attend to and stops no row early."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return ""

    def bos_id(self):
        return None  # Tunix then prepends nothing

    def eos_id(self) -> int:
        return self.vocab_size

    def pad_id(self) -> int:
        return self.vocab_size + 1


def model_config(hf: dict, dtype):
    """Tunix's Qwen3 ModelConfig for an HF Qwen3 config.json (dense models only)."""
    from tunix.models.qwen3 import model as qwen3_model

    if hf.get("model_type") != "qwen3":
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; this worker builds Tunix's "
                         "Qwen3 only (model_type 'qwen3')")
    rope = hf.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 1_000_000))
    return qwen3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope_theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)),
        shd_config=qwen3_model.ShardingConfig.get_default_sharding(is_sampling=True),
        dtype=dtype, param_dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="HF directory: config.json + *.safetensors")
    parser.add_argument("--prompts", required=True, help=".npy int array [rows, prompt tokens]")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be at least 1, got {args.new_tokens}")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen3 import params as qwen3_params

    dtype = getattr(jnp, args.dtype)
    with open(f"{args.checkpoint}/config.json") as f:
        hf_config = json.load(f)
    config = model_config(hf_config, dtype)
    model = qwen3_params.create_model_from_safe_tensors(args.checkpoint, config, mesh=None, dtype=dtype)

    prompts = np.load(args.prompts)
    if prompts.ndim != 2 or prompts.min() < 0 or prompts.max() >= config.vocab_size:
        raise ValueError(f"--prompts must be a 2-d array of ids in [0, {config.vocab_size}), got shape "
                         f"{prompts.shape}, range [{prompts.min()}, {prompts.max()}]")
    rows, prompt_len = prompts.shape
    texts = [" ".join(map(str, row)) for row in prompts.tolist()]
    tokenizer = IdTokenizer(config.vocab_size)
    cache = sampler_lib.CacheConfig(cache_size=prompt_len + args.new_tokens, num_layers=config.num_layers,
                                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    sampler = sampler_lib.Sampler(transformer=model, tokenizer=tokenizer, cache_config=cache)

    def generate() -> None:
        out = sampler(texts, max_generation_steps=args.new_tokens, max_prompt_length=prompt_len,
                      temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[tokenizer.eos_id()],
                      seed=args.seed, echo=False)
        lengths = {len(t) for t in out.tokens}
        if len(out.tokens) != rows or lengths != {args.new_tokens}:
            raise RuntimeError(f"Tunix returned {len(out.tokens)} rows of lengths {sorted(lengths)}; "
                               f"expected {rows} rows of {args.new_tokens} tokens")

    start = time.perf_counter()
    generate()
    emit(event="ready", version=importlib.metadata.version("google-tunix"), device=jax.devices()[0].device_kind,
         warmup_s=time.perf_counter() - start, rows=rows, new_tokens=args.new_tokens)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command != "run":
            raise ValueError(f"unknown command {command!r}; the worker reads 'run' or 'quit'")
        start = time.perf_counter()
        generate()
        emit(event="run", seconds=time.perf_counter() - start)


if __name__ == "__main__":
    main()
