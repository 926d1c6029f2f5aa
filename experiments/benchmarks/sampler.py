"""Sampler throughput against transformers' PyTorch `generate`, measured in the same run.

Same random-init Qwen3-shaped weights (hidden 512, 8 layers, 8 heads / 4 kv heads, vocab 32000,
f32, tied embeddings: 41.6M parameters), same batch of 64 rows x 64 prompt tokens x 128 new
tokens, sampling at temperature 1 from the full distribution, every row generating all 128 tokens.
Also times a batch where half the rows carry a 64-token guide.

    python experiments/benchmarks/sampler.py [--batch 64 --prompt-len 64 --new-tokens 128 --repeats 3]

The last line is `sampler/transformers tokens-per-second ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from g2rpo_jax import models, sampling

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)


def best_of(repeats: int, run) -> float:
    """Best wall time of `repeats` runs (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--guide-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    torch.manual_seed(0)
    hf_model = Qwen3ForCausalLM(Qwen3Config(**MODEL, rope_parameters={"rope_type": "default", "rope_theta": 1e6})).eval()
    with tempfile.TemporaryDirectory() as path:
        hf_model.save_pretrained(path)
        cfg, params = models.load_hf(path)
    n_params = sum(p.numel() for p in hf_model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters, {jax.devices()[0].platform}, torch threads {args.torch_threads}")

    rng = np.random.RandomState(0)
    prompts = rng.randint(2, MODEL["vocab_size"], (args.batch, args.prompt_len))
    new_tokens = args.batch * args.new_tokens

    def ours(guides=None, seed=0):
        out = sampling.sample(cfg, params, prompts.tolist(), guides, max_new_tokens=args.new_tokens,
                              temperature=1.0, eos_ids=(), rng=jax.random.key(seed))
        assert out.mask.sum() == new_tokens, "every row must produce all new tokens"

    def transformers_generate():
        with torch.no_grad():
            out = hf_model.generate(torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    eos_token_id=None, pad_token_id=0)
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens)

    guides = [list(rng.randint(2, MODEL["vocab_size"], args.guide_len)) if i % 2 else [] for i in range(args.batch)]
    start = time.perf_counter()
    ours()
    ours(guides)
    print(f"sampler compile + first runs: {time.perf_counter() - start:.1f} s")
    ours_s = best_of(args.repeats, ours)
    guided_s = best_of(args.repeats, lambda: ours(guides))
    hf_s = best_of(max(1, args.repeats - 1), transformers_generate)

    print(f"transformers generate: {hf_s:.2f} s  {new_tokens / hf_s:.0f} tokens/s")
    print(f"sampler (unguided):    {ours_s:.2f} s  {new_tokens / ours_s:.0f} tokens/s")
    print(f"sampler (half the rows with a {args.guide_len}-token guide): {guided_s:.2f} s "
          f"{new_tokens / guided_s:.0f} completion tokens/s  guided/unguided time: {guided_s / ours_s:.2f}")
    print(f"sampler/transformers tokens-per-second ratio: {hf_s / ours_s:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
