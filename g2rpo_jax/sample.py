"""Sample completions from a checkpoint, optionally forcing a guide prefix.

    python -m g2rpo_jax.sample --checkpoint DIR --prompt "What is 3*7?" [--guide "First, "] \
        [--num_samples 4 --max_new_tokens 256 --temperature 0.6 --top_p 0.95 --top_k 20]

The chat template is applied when the tokenizer has one. The guided part of each completion is
shown between « and » (or highlighted on a terminal).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from g2rpo_jax import data, models, sampling


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m g2rpo_jax.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--prompt", required=True, help="the user message (wrapped in the chat template unless "
                        "--no_chat_template)")
    parser.add_argument("--guide", default="", help="text forced at the start of every completion")
    parser.add_argument("--num_samples", type=int, default=1, help="completions to draw (default 1)")
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="budget per completion, guide tokens included (default 256)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, > 0 (default 1.0)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="nucleus sampling: keep the smallest set of tokens with this much probability (1 = off)")
    parser.add_argument("--top_k", type=int, default=0, help="0 = off, 1 = greedy")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the weights are loaded and run in (default float32)")
    parser.add_argument("--no_chat_template", action="store_true", help="feed the prompt text as is")
    parser.add_argument("--enable_thinking", action=argparse.BooleanOptionalAction, default=True,
                        help="Qwen3 chat template: let the model think first (default) or not")
    return parser.parse_args(argv)


def encode_prompt(tokenizer, text: str, use_chat_template: bool, enable_thinking: bool) -> list[int]:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True,
            enable_thinking=enable_thinking, return_dict=False,
        ))
    return tokenizer.encode(text, add_special_tokens=False)


def render(tokenizer, guide: list[int], rest: list[int], highlight: bool) -> str:
    guided, sampled = tokenizer.decode(guide), tokenizer.decode(rest)
    if not guide:
        return sampled
    return f"\033[1;36m{guided}\033[0m{sampled}" if highlight else f"«{guided}»{sampled}"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return generate(args)
    except (ValueError, FileNotFoundError) as error:  # our messages name the flag or file and the fix
        print(f"python -m g2rpo_jax.sample: {error}", file=sys.stderr)
        return 2


def generate(args: argparse.Namespace) -> int:
    """Loads the checkpoint, samples and prints the completions; returns the exit status."""
    start = time.perf_counter()
    cfg, params = models.load_hf(args.checkpoint, dtype=jnp.dtype(args.dtype))
    tokenizer = models.load_tokenizer(args.checkpoint)
    prompt = encode_prompt(tokenizer, args.prompt, not args.no_chat_template, args.enable_thinking)
    guide = tokenizer.encode(args.guide, add_special_tokens=False) if args.guide else []
    if len(prompt) + args.max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"the prompt ({len(prompt)} tokens) + --max_new_tokens={args.max_new_tokens} = "
                         f"{len(prompt) + args.max_new_tokens} positions, more than the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}; lower --max_new_tokens")
    eos_ids = data.stop_token_ids(tokenizer)
    pad_id = data.pad_token_id(tokenizer)
    print(f"[sample] loaded {args.checkpoint} in {time.perf_counter() - start:.1f} s; prompt {len(prompt)} tokens, "
          f"guide {len(guide)} tokens, stop ids {eos_ids}", file=sys.stderr)

    start = time.perf_counter()
    out = sampling.sample(
        cfg, params, [prompt] * args.num_samples, [guide] * args.num_samples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        eos_ids=eos_ids, rng=jax.random.key(args.seed), pad_id=pad_id,
    )
    elapsed = time.perf_counter() - start
    highlight = sys.stdout.isatty()
    for i in range(args.num_samples):
        length = int(out.lengths[i])
        tokens = out.tokens[i, :length].tolist()
        guided = int(out.guided_mask[i].sum())
        ended = "stopped at EOS" if tokens and tokens[-1] in eos_ids else "hit max_new_tokens"
        print(f"=== sample {i + 1}/{args.num_samples}: {length} tokens ({guided} guided), {ended}, "
              f"mean log-prob {out.logprobs[i, guided:length].mean() if length > guided else 0.0:.3f} ===")
        print(render(tokenizer, tokens[:guided], tokens[guided:], highlight))
    print(f"[sample] {int(out.lengths.sum())} tokens in {elapsed:.1f} s (including compilation)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
