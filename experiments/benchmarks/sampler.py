"""Sampler throughput against transformers' PyTorch `generate` and Google Tunix's JAX sampler.

All sides run in the same invocation on the same random-init Qwen3-shaped weights (hidden 512,
8 layers, 8 heads / 4 kv heads, vocab 32000, f32, tied embeddings: 41.6M parameters), saved once
as an HF checkpoint that every side loads. Sampling is at temperature 1 from the full distribution
(no top-k, no top-p) and no row stops early: there is no EOS, every row generates all its tokens.

Plain case: 64 rows x 64 prompt tokens x 128 new tokens (one prompt per row).
  - ours: `g2rpo_jax.sampling.sample`, the public API the RL loop calls (so it includes whatever
    that function does, e.g. computing the log-prob of every sampled token);
  - transformers `generate` (PyTorch, `--torch-threads` threads);
  - Tunix's `Sampler` (google-tunix, in its own venv `.venv-tunix` since it needs safetensors<0.8;
    run in a worker process, experiments/benchmarks/tunix_sampler.py), its Qwen3 built from the
    same checkpoint, called as a user would: prompts in, generated ids out, no log-probs asked for.
  - ours again with half the rows carrying a 64-token guide (forced tokens), for the
    guided/unguided time ratio; completion tokens (forced ones included) per second.

RL-shaped case: 8 prompts x G = 8 rows each (64 rows; the rows of a group share their prompt), and
in each group a quarter of the rows (2 of 8) carry the group's 64-token guide, as guided GRPO
samples them. Every row has a 128-token completion; in a guided row that is the 64 guide tokens
then 64 sampled ones. Ours gets the prompts and guides as the RL loop gives them. transformers has
no forced-prefix decoding, so a guided row's guide is appended to its prompt and the batch is
left-padded to the longest row (64 + 64 tokens) with an attention mask, which is how one would
run guided rollouts with `generate`. It then decodes 128 steps for every row: the unguided rows
need all 128, and a batch decodes in lock-step, so stopping the guided rows after their 64 sampled
tokens would save no step; their surplus tokens are discarded. Both sides therefore deliver the
same 64 x 128 completion tokens, and tokens/s counts those (guide tokens included), so the ratio is
a ratio of wall times. transformers prefills each row's prompt (and padding) separately; sharing
a group's prompt, if ours does, is what this case is there to show.

Timing: every side is warmed up first (compilation on the JAX sides, the first call on
transformers), then all runs take turns for `--repeats` rounds, so a slow spell of the machine
falls on all of them; each figure is the best (minimum) wall time over its rounds, and every
round's time is listed next to it.

    python experiments/benchmarks/sampler.py [--peers transformers,tunix] [--batch 64 --prompt-len 64
        --new-tokens 128 --guide-len 64 --group-size 8 --repeats 3] [--quick]

`--quick` runs tiny shapes once (a model of 0.1M parameters, 16 rows), for tests of this script.
A peer whose venv is missing is skipped with a message. The last lines are
`sampler/transformers tokens-per-second ratio: X.XX`, `sampler/tunix tokens-per-second ratio: X.XX`
and `rl-shaped sampler/transformers tokens-per-second ratio: X.XX` (ours / peer, higher is better),
one for each peer that ran. The defaults are the CPU acceptance setting. On a GPU machine,
`--torch-device cuda` runs transformers on the GPU as well, and `--model qwen3-0.6b --dtype
bfloat16` measures a real model size (Tunix runs on whatever its own JAX finds; a device that
differs from ours is flagged).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from g2rpo_jax import models, sampling
from shapes import SHAPES, hf_config

REPO = Path(__file__).resolve().parents[2]
TUNIX_WORKER = Path(__file__).resolve().with_name("tunix_sampler.py")
TUNIX_REQUIREMENTS = "experiments/benchmarks/requirements-tunix.txt"
PEERS = ("transformers", "tunix")

# Shapes of a full run and of --quick; a flag given explicitly overrides either.
FULL = dict(model="bench", batch=64, prompt_len=64, new_tokens=128, guide_len=64, group_size=8, repeats=3)
QUICK = dict(model="tiny", batch=16, prompt_len=8, new_tokens=16, guide_len=8, group_size=8, repeats=1)


def interleaved_times(repeats: int, runs: dict) -> dict[str, list[float]]:
    """Wall times of each run over `repeats` rounds, taking the runs in turn so a slow spell of the
    machine (other work on it) falls on all of them rather than on one. A run that returns a
    number has timed itself (a worker process reporting its own time); that number is used."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            reported = run()
            times[name].append(reported if reported is not None else time.perf_counter() - start)
    return times


class TunixWorker:
    """tunix_sampler.py running in the Tunix venv: loads the checkpoint, warms up, then samples
    the same batch once per `run()` and reports the seconds that took."""

    def __init__(self, python: Path, checkpoint: str, prompts: np.ndarray, new_tokens: int, dtype: str,
                 workdir: str):
        prompts_path = os.path.join(workdir, "tunix_prompts.npy")
        np.save(prompts_path, prompts)
        self.python = python
        self.log = open(os.path.join(workdir, "tunix_worker.log"), "w+")
        self.process = subprocess.Popen(
            [str(python), str(TUNIX_WORKER), "--checkpoint", checkpoint, "--prompts", prompts_path,
             "--new-tokens", str(new_tokens), "--dtype", dtype],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.info = self._read("ready")

    def _read(self, event: str) -> dict:
        for line in self.process.stdout:
            if line.startswith("TUNIX "):
                message = json.loads(line[len("TUNIX "):])
                if message.get("event") == event:
                    return message
        status = self.process.wait()
        self.log.seek(0)
        tail = "".join(self.log.readlines()[-25:])
        raise RuntimeError(f"the Tunix worker ({self.python} {TUNIX_WORKER.name}) exited with status {status} "
                           f"before reporting '{event}'; the end of its log:\n{tail}")

    def run(self) -> float:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return float(self._read("run")["seconds"])

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers to measure, from {', '.join(PEERS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and one round, for testing this script (numbers mean nothing)")
    parser.add_argument("--batch", type=int, help=f"rows (default {FULL['batch']}, --quick {QUICK['batch']})")
    parser.add_argument("--prompt-len", type=int, help=f"default {FULL['prompt_len']}")
    parser.add_argument("--new-tokens", type=int, help=f"completion tokens per row (default {FULL['new_tokens']})")
    parser.add_argument("--guide-len", type=int, help=f"forced tokens in a guided row (default {FULL['guide_len']})")
    parser.add_argument("--group-size", type=int,
                        help=f"G of the RL-shaped case: rows per prompt, a quarter of them guided "
                             f"(default {FULL['group_size']})")
    parser.add_argument("--repeats", type=int, help=f"interleaved rounds, best of which counts (default {FULL['repeats']})")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--torch-device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--model", choices=sorted(SHAPES), help=f"default {FULL['model']}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tunix-python", type=Path, default=REPO / ".venv-tunix" / "bin" / "python",
                        help="python of the Tunix venv (default: .venv-tunix/bin/python in the repository)")
    args = parser.parse_args(argv)

    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(f"--peers {','.join(unknown)}: unknown peer; valid peers are {', '.join(PEERS)}")
    for flag in ("batch", "prompt_len", "new_tokens", "guide_len", "repeats", "torch_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.guide_len >= args.new_tokens:
        parser.error(f"--guide-len {args.guide_len} must be below --new-tokens {args.new_tokens}: "
                     "a guided row's completion is its guide and then sampled tokens")
    if args.group_size < 4 or args.batch % args.group_size:
        parser.error(f"--group-size {args.group_size} must be at least 4 (a quarter of each group is guided) "
                     f"and divide --batch {args.batch}; e.g. --batch 64 --group-size 8")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    model_shape = hf_config(args.model)
    vocab = model_shape["vocab_size"]
    with tempfile.TemporaryDirectory() as workdir:
        run_benchmark(args, model_shape, vocab, workdir)


def run_benchmark(args, model_shape: dict, vocab: int, workdir: str) -> None:
    checkpoint = os.path.join(workdir, "checkpoint")
    torch.manual_seed(0)
    torch_config = Qwen3Config(**model_shape)
    hf_model = Qwen3ForCausalLM(torch_config).to(getattr(torch, args.dtype)).eval()
    hf_model.save_pretrained(checkpoint)
    cfg, params = models.load_hf(checkpoint)
    hf_model = hf_model.to(args.torch_device)
    n_params = sum(p.numel() for p in hf_model.parameters())
    our_device = jax.devices()[0]
    print(f"model: {args.model} {args.dtype}, {n_params / 1e6:.1f}M parameters; sampler on {our_device.device_kind}; "
          f"transformers on {args.torch_device}" + (f" with {args.torch_threads} threads" if args.torch_device == "cpu" else ""))

    rng = np.random.RandomState(0)
    prompts = rng.randint(2, vocab, (args.batch, args.prompt_len))  # [B, T]
    prompt_rows = prompts.tolist()
    completion_tokens = args.batch * args.new_tokens
    guides = [rng.randint(2, vocab, args.guide_len).tolist() if i % 2 else [] for i in range(args.batch)]

    # RL-shaped batch: row i belongs to group i // G; the first G/4 rows of a group carry its guide.
    G = args.group_size
    guided_per_group = G // 4
    group_prompts = rng.randint(2, vocab, (args.batch // G, args.prompt_len))
    group_guides = rng.randint(2, vocab, (args.batch // G, args.guide_len))
    rl_prompts = np.repeat(group_prompts, G, axis=0)  # [B, T]
    rl_prompt_rows = rl_prompts.tolist()
    rl_guides = [group_guides[i // G].tolist() if i % G < guided_per_group else [] for i in range(args.batch)]
    # transformers: prompt + guide as the input, left-padded with an attention mask.
    hf_width = args.prompt_len + args.guide_len
    rl_input = np.zeros((args.batch, hf_width), np.int64)  # [B, T + guide]
    rl_attention = np.zeros((args.batch, hf_width), np.int64)
    for i in range(args.batch):
        row = rl_prompt_rows[i] + rl_guides[i]
        rl_input[i, hf_width - len(row):] = row
        rl_attention[i, hf_width - len(row):] = 1

    def ours(rows, row_guides=None):
        def run():
            out = sampling.sample(cfg, params, rows, row_guides, max_new_tokens=args.new_tokens,
                                  temperature=1.0, eos_ids=(), rng=jax.random.key(0))
            assert int(out.mask.sum()) == completion_tokens, "every row must produce all new tokens"
        return run

    def transformers_generate(input_ids: np.ndarray, attention: np.ndarray, new_tokens: int = args.new_tokens):
        def run():
            ids = torch.as_tensor(input_ids, device=args.torch_device)
            mask = torch.as_tensor(attention, device=args.torch_device)
            with torch.no_grad():
                out = hf_model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                        top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        eos_token_id=None, pad_token_id=0)
            if args.torch_device != "cpu":
                torch.cuda.synchronize()
            assert out.shape == (input_ids.shape[0], input_ids.shape[1] + new_tokens)
        return run

    runs = {}
    tunix = None
    if "tunix" in args.peers:
        if not args.tunix_python.exists():
            print(f"tunix: skipped: no Tunix venv at {args.tunix_python}; build it with `python3 -m venv .venv-tunix && "
                  f".venv-tunix/bin/pip install -r {TUNIX_REQUIREMENTS}` (or pass --tunix-python)")
        else:
            tunix = TunixWorker(args.tunix_python, checkpoint, prompts, args.new_tokens, args.dtype, workdir)
            info = tunix.info
            print(f"tunix: google-tunix {info['version']} on {info['device']} (its own venv, {args.tunix_python}); "
                  f"warm-up incl. compile: {info['warmup_s']:.1f} s")
            if info["device"] != our_device.device_kind:
                print(f"note: Tunix ran on {info['device']} and this sampler on {our_device.device_kind}: "
                      "the Tunix ratio compares different devices")
    else:
        print("tunix: not measured (not in --peers)")
    if "transformers" not in args.peers:
        print("transformers: not measured (not in --peers)")

    try:
        start = time.perf_counter()
        ours(prompt_rows)()
        ours(prompt_rows, guides)()
        ours(rl_prompt_rows, rl_guides)()
        print(f"sampler compile + first runs: {time.perf_counter() - start:.1f} s")
        plain_attention = np.ones_like(prompts)
        if "transformers" in args.peers:
            # Warm-up of both shapes (the padded one takes another attention-mask path): first-call costs.
            transformers_generate(prompts, plain_attention, new_tokens=2)()
            transformers_generate(rl_input, rl_attention, new_tokens=2)()
            runs["transformers"] = transformers_generate(prompts, plain_attention)
        if tunix is not None:
            runs["tunix"] = tunix.run
        runs["ours"] = ours(prompt_rows)
        runs["guided"] = ours(prompt_rows, guides)
        if "transformers" in args.peers:
            runs["rl transformers"] = transformers_generate(rl_input, rl_attention)
        runs["rl ours"] = ours(rl_prompt_rows, rl_guides)
        times = interleaved_times(args.repeats, runs)
    finally:
        if tunix is not None:
            tunix.close()

    best = {name: min(t) for name, t in times.items()}

    def line(label: str, name: str, unit: str = "tokens/s") -> str:
        rounds = " ".join(f"{t:.2f}" for t in times[name])
        return f"  {label:<46} {best[name]:7.2f} s {completion_tokens / best[name]:8.0f} {unit}   rounds: {rounds}"

    print(f"best of {args.repeats} interleaved round(s) per run (wall seconds of every round listed)")
    print(f"plain: {args.batch} rows x {args.prompt_len} prompt tokens -> {args.new_tokens} new tokens")
    if "transformers" in times:
        print(line("transformers generate", "transformers"))
    if "tunix" in times:
        print(line(f"tunix {tunix.info['version']} sampler", "tunix"))
    print(line("sampler (unguided)", "ours"))
    print(line(f"sampler (half the rows with a {args.guide_len}-token guide)", "guided", "completion tokens/s")
          + f"   guided/unguided time: {best['guided'] / best['ours']:.2f}")
    print(f"rl-shaped: {args.batch // G} prompts x G = {G}, {guided_per_group} rows per group with the group's "
          f"{args.guide_len}-token guide, {args.new_tokens} completion tokens per row")
    if "rl transformers" in times:
        print(line("transformers generate (guide in the prompt)", "rl transformers", "completion tokens/s"))
    print(line("sampler", "rl ours", "completion tokens/s"))
    if "transformers" in times:
        print(f"sampler/transformers tokens-per-second ratio: {best['transformers'] / best['ours']:.2f}")
    if "tunix" in times:
        print(f"sampler/tunix tokens-per-second ratio: {best['tunix'] / best['ours']:.2f}")
    if "rl transformers" in times:
        print(f"rl-shaped sampler/transformers tokens-per-second ratio: {best['rl transformers'] / best['rl ours']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
