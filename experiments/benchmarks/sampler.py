"""Sampler throughput against transformers' PyTorch `generate`, measured in the same run.

Same random-init Qwen3-shaped weights (hidden 512, 8 layers, 8 heads / 4 kv heads, vocab 32000,
f32, tied embeddings: 41.6M parameters), same batch of 64 rows x 64 prompt tokens x 128 new
tokens, sampling at temperature 1 from the full distribution, every row generating all 128 tokens.
Also times a batch where half the rows carry a 64-token guide.

    python experiments/benchmarks/sampler.py [--batch 64 --prompt-len 64 --new-tokens 128 --repeats 3]

The last line is `sampler/transformers tokens-per-second ratio: X.XX`. The defaults are the CPU
acceptance setting. On a GPU machine, `--torch-device cuda` runs transformers on the GPU as well,
and `--model qwen3-0.6b --dtype bfloat16` measures a real model size.
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

MODELS = {
    "bench": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}


def interleaved_best(repeats: dict[str, int], runs: dict) -> dict[str, float]:
    """Best wall time of each run over its number of repeats, taking the runs in turn so a slow
    spell of the machine (other work on it) falls on all of them rather than on one."""
    times = {name: [] for name in runs}
    for round_ in range(max(repeats.values())):
        for name, run in runs.items():
            if round_ < repeats[name]:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--guide-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--torch-device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--model", default="bench", choices=sorted(MODELS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    model_shape = MODELS[args.model]

    torch.manual_seed(0)
    hf_config = Qwen3Config(**model_shape, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    hf_model = Qwen3ForCausalLM(hf_config).to(getattr(torch, args.dtype)).eval()
    with tempfile.TemporaryDirectory() as path:
        hf_model.save_pretrained(path)
        cfg, params = models.load_hf(path)
    hf_model = hf_model.to(args.torch_device)
    n_params = sum(p.numel() for p in hf_model.parameters())
    print(f"model: {args.model} {args.dtype}, {n_params / 1e6:.1f}M parameters; sampler on {jax.devices()[0].device_kind}; "
          f"transformers on {args.torch_device}" + (f" with {args.torch_threads} threads" if args.torch_device == "cpu" else ""))

    rng = np.random.RandomState(0)
    prompts = rng.randint(2, model_shape["vocab_size"], (args.batch, args.prompt_len))
    new_tokens = args.batch * args.new_tokens

    def ours(guides=None, seed=0):
        out = sampling.sample(cfg, params, prompts.tolist(), guides, max_new_tokens=args.new_tokens,
                              temperature=1.0, eos_ids=(), rng=jax.random.key(seed))
        assert out.mask.sum() == new_tokens, "every row must produce all new tokens"

    def transformers_generate():
        input_ids = torch.as_tensor(prompts, device=args.torch_device)
        with torch.no_grad():
            out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    eos_token_id=None, pad_token_id=0)
        if args.torch_device != "cpu":
            torch.cuda.synchronize()
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens)

    guides = [list(rng.randint(2, model_shape["vocab_size"], args.guide_len)) if i % 2 else [] for i in range(args.batch)]
    start = time.perf_counter()
    ours()
    ours(guides)
    print(f"sampler compile + first runs: {time.perf_counter() - start:.1f} s")
    if args.torch_device != "cpu":
        transformers_generate()  # warm-up: CUDA kernels load on first use
    best = interleaved_best(
        {"ours": args.repeats, "guided": args.repeats, "transformers": max(1, args.repeats - 1)},
        {"ours": ours, "guided": lambda: ours(guides), "transformers": transformers_generate},
    )
    ours_s, guided_s, hf_s = best["ours"], best["guided"], best["transformers"]

    print(f"transformers generate: {hf_s:.2f} s  {new_tokens / hf_s:.0f} tokens/s")
    print(f"sampler (unguided):    {ours_s:.2f} s  {new_tokens / ours_s:.0f} tokens/s")
    print(f"sampler (half the rows with a {args.guide_len}-token guide): {guided_s:.2f} s "
          f"{new_tokens / guided_s:.0f} completion tokens/s  guided/unguided time: {guided_s / ours_s:.2f}")
    print(f"sampler/transformers tokens-per-second ratio: {hf_s / ours_s:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
