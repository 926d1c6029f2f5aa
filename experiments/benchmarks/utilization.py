"""How close the train step and the sampler come to this machine's limits, measured in one run.

Measures, in the same process and dtype:
  * the matmul peak: best FLOP/s of a square `jnp.dot` (2048³ on a CPU, 8192³ on a GPU);
  * the memory bandwidth: best bytes/s of a sum over a large array (a read stream);
  * the train step (`train_step.make_train_step`, AdamW, β = 0, μ = 1) on a random-init model and
    a batch of `--rows` rollouts × (prompt + completion) tokens, the G rows of a group sharing their
    prompt, which the step runs once per group (`shared_prompts=True`, as the training loop does).
    Model FLOPs are `g2rpo_jax.flops`' count (PaLM's MFU count; the LM head on completion positions
    only, where the loss needs it; a group's prompt once). The
    ratio to the matmul peak is the model-FLOPs utilisation (MFU). XLA's own count of the compiled
    program (recomputation and elementwise work included, loop bodies once) is printed beside it.
  * decoding (`sampling.sample`, temperature 1, every row generating all new tokens): decode time
    is the time for N new tokens minus the time for 1 (which is the prefill plus one step). Its
    memory floor is the bytes each step must read (the parameters, and the KV cache up to the
    current length) at the measured bandwidth; its compute floor is the matmul FLOPs at peak.
    Reported: bytes moved per second as a share of the bandwidth ("memory roofline"), and the
    floor (compute + memory, as issue 3's note derived it) as a share of the measured time.
  * the guided/unguided time ratio: a quarter of the rows carrying a `--guide-len` token guide.

    python experiments/benchmarks/utilization.py                        # CPU acceptance: 512/8, f32
    python experiments/benchmarks/utilization.py --model qwen3-1.7b --dtype bfloat16 --rows 64 \
        --prompt-len 256 --new-tokens 512 --micro-batch 16 --remat           # one GPU

Each figure is printed as soon as it is measured (`train-step MFU: X%`, `decode memory roofline: X%`,
`guided/unguided time: X`). Times are the median of `--repeats` runs after a warm-up run
(compilation excluded); the spread is printed beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from g2rpo_jax import guidance, models, optim, sampling, train_state, train_step
from g2rpo_jax.flops import decode_step_cost, matmul_parameters, train_step_flops
from shapes import SHAPES, model_config, random_params

# ----------------------------------------------------------------------------- machine limits


def _times(run, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `run()`, after one warm-up call (compilation)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def median_and_spread(run, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) wall seconds of `run()` over `repeats` calls after one warm-up call."""
    times = _times(run, repeats)
    return statistics.median(times), min(times), max(times)


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n×n by n×n product in `dtype` (accumulation as XLA does it by default)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    product = jax.jit(jnp.dot)
    return 2 * n**3 / min(_times(lambda: product(a, b).block_until_ready(), repeats))


def memory_bandwidth(num_bytes: int, repeats: int = 5) -> float:
    """Best bytes/s of summing a float32 array of `num_bytes`: a read stream, as a decode step reads
    its weights and KV cache (an elementwise copy measured far less on XLA:CPU)."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return num_bytes / min(_times(lambda: total(x).block_until_ready(), repeats))


# ----------------------------------------------------------------------------- the two workloads


@dataclasses.dataclass
class Shape:
    rows: int
    group_size: int
    prompt_len: int
    new_tokens: int
    guide_len: int
    micro_batch: int
    remat: bool


def random_batch(cfg: models.ModelConfig, shape: Shape, seed: int = 0) -> train_step.RolloutBatch:
    """Full-length rollouts with random tokens and rewards (every group has reward spread); the
    G rows of a group share their prompt, as sampled groups do."""
    rs = np.random.RandomState(seed)
    rows, prompt_len, completion_len = shape.rows, shape.prompt_len, shape.new_tokens
    rewards = np.tile(np.arange(shape.group_size) % 2, rows // shape.group_size).astype(np.float32)
    prompts = np.repeat(rs.randint(2, cfg.vocab_size, (rows // shape.group_size, prompt_len)), shape.group_size, axis=0)
    return train_step.make_batch(
        prompts, np.ones((rows, prompt_len)),
        rs.randint(2, cfg.vocab_size, (rows, completion_len)), np.ones((rows, completion_len)), rewards)


def time_train_step(cfg, params, shape: Shape, repeats: int) -> dict:
    step_cfg = train_step.get_default_config()
    step_cfg.update(group_size=shape.group_size, beta=0.0, micro_batch_size=shape.micro_batch, remat=shape.remat)
    gcfg = guidance.get_default_config()
    optimizer = optim.make_optimizer(optim.get_default_config())
    # A copy: the step donates its state, and the sampler still needs the parameters.
    state = train_state.create(jax.tree.map(jnp.copy, params), optimizer, gcfg, jax.random.key(0))
    batch = jax.device_put(random_batch(cfg, shape))
    step = train_step.make_train_step(cfg, step_cfg, gcfg, optimizer, donate=True, shared_prompts=True)
    start = time.perf_counter()
    compiled = step.lower(state, None, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], None, batch)
        jax.block_until_ready(metrics)

    median, low, high = median_and_spread(run, repeats)
    return dict(median=median, low=low, high=high, compile=compile_s,
                flops=train_step_flops(cfg, shape.rows, shape.prompt_len, shape.new_tokens,
                                       shared_prompt_group=shape.group_size),
                xla_flops=float((cost or {}).get("flops", float("nan"))))


def _sampler_call(cfg, params, shape: Shape):
    """`run(new_tokens, guided)`: one `sampling.sample` call on fixed random prompts, every row
    generating all new tokens; guided, a quarter of the rows carry a `shape.guide_len`-token guide."""
    rs = np.random.RandomState(1)
    prompts = rs.randint(2, cfg.vocab_size, (shape.rows, shape.prompt_len)).tolist()
    guides = [list(rs.randint(2, cfg.vocab_size, shape.guide_len)) if i % 4 == 0 else [] for i in range(shape.rows)]

    def run(new_tokens: int, guided: bool = False):
        out = sampling.sample(cfg, params, prompts, guides if guided else None, max_new_tokens=new_tokens,
                              temperature=1.0, eos_ids=(), rng=jax.random.key(0))
        assert int(out.mask.sum()) == shape.rows * new_tokens, "every row must produce all new tokens"

    return run


def time_decode(run, cfg, shape: Shape, repeats: int) -> dict:
    """The times of 1 and of N new tokens (`run` from `_sampler_call`), and the decode time between
    them with its FLOPs and bytes."""
    one = median_and_spread(lambda: run(1), repeats)
    full = median_and_spread(lambda: run(shape.new_tokens), repeats)
    steps = shape.new_tokens - 1
    flops = bytes_read = 0.0
    for position in range(shape.prompt_len + 1, shape.prompt_len + shape.new_tokens):
        step_flops, step_bytes = decode_step_cost(cfg, shape.rows, position, jnp.dtype(cfg.dtype).itemsize)
        flops, bytes_read = flops + step_flops, bytes_read + step_bytes
    return dict(decode=full[0] - one[0], full=full, one=one, steps=steps, flops=flops, bytes=bytes_read)


def time_guided(run, shape: Shape, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) seconds of N new tokens with a quarter of the rows guided."""
    return median_and_spread(lambda: run(shape.new_tokens, guided=True), repeats)


# ----------------------------------------------------------------------------- report


def _spread(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.3f} s (min {t[1]:.3f}, max {t[2]:.3f})"


def _flop(x: float) -> str:
    """FLOPs (or FLOP/s) in the unit that keeps three digits: G below 1e12, else T."""
    return f"{x / 1e12:.3f} T" if x >= 1e12 else f"{x / 1e9:.3f} G"


def machine_lines(name, cfg, peak, bandwidth) -> list[str]:
    device = jax.devices()[0]
    body, head = matmul_parameters(cfg)
    return [
        f"model: {name} {cfg.dtype}, {(body + head) / 1e6:.1f}M matmul parameters; {device.platform} "
        f"({device.device_kind}), {jax.device_count()} device(s), jax {jax.__version__}",
        f"matmul peak: {_flop(peak)}FLOP/s   memory bandwidth: {bandwidth / 1e9:.1f} GB/s",
    ]


def train_lines(shape, peak, train) -> list[str]:
    achieved = train["flops"] / train["median"]
    tokens = shape.rows * (shape.prompt_len + shape.new_tokens)
    return [
        f"train step: {shape.rows} rows x ({shape.prompt_len} + {shape.new_tokens}) tokens, micro-batch "
        f"{shape.micro_batch or shape.rows}, remat {shape.remat}: {_spread((train['median'], train['low'], train['high']))}, "
        f"compile {train['compile']:.1f} s, {tokens / train['median']:.0f} tokens/s",
        f"  model FLOPs {_flop(train['flops'])} ({_flop(achieved)}FLOP/s); XLA's cost analysis, which "
        f"counts a loop body (a micro-batch) once: {_flop(train['xla_flops'])}",
        f"train-step MFU: {achieved / peak:.0%}",
    ]


def decode_lines(shape, peak, bandwidth, decode) -> list[str]:
    decode_s = decode["decode"]
    memory_floor = decode["bytes"] / bandwidth
    compute_floor = decode["flops"] / peak
    new_tokens = shape.rows * shape.new_tokens
    return [
        f"sampler: {shape.rows} rows x {shape.prompt_len} prompt + {shape.new_tokens} new tokens: "
        f"{_spread(decode['full'])}, {new_tokens / decode['full'][0]:.0f} tokens/s; 1 new token {_spread(decode['one'])}",
        f"  decode {decode['steps']} steps: {decode_s:.3f} s ({decode_s / decode['steps'] * 1e3:.2f} ms/step), "
        f"{decode['bytes'] / decode_s / 1e9:.1f} GB/s read; floor: memory {memory_floor:.3f} s + "
        f"compute {compute_floor:.3f} s",
        f"decode floor share: {(memory_floor + compute_floor) / decode_s:.0%}",
        f"decode memory roofline: {decode['bytes'] / decode_s / bandwidth:.0%}",
    ]


def guided_lines(shape, decode, guided) -> list[str]:
    return [f"  guided (a quarter of rows with a {shape.guide_len}-token guide): {_spread(guided)}; "
            f"guided/unguided time: {guided[0] / decode['full'][0]:.2f}"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=64, help="rollouts per batch (prompts × G)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--guide-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="rows per gradient micro-batch (0 = all); one group (8) keeps a CPU's matmuls in cache")
    parser.add_argument("--remat", action="store_true", help="rematerialise decoder layers in the backward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=0, help="0: 8192 on a GPU, 2048 otherwise")
    parser.add_argument("--bandwidth-mib", type=int, default=0, help="0: 2048 on a GPU, 256 otherwise")
    parser.add_argument("--skip", choices=["train", "decode"], default=None)
    args = parser.parse_args(argv)
    if args.rows % args.group_size:
        parser.error(f"--rows={args.rows} must be a multiple of --group-size={args.group_size}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens={args.new_tokens}: decode time is N new tokens minus 1, so N must be >= 2")
    return args


_START = time.perf_counter()


def _say(lines: list[str]) -> None:
    print("\n".join(lines), flush=True)


def _progress(what: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f} s] {what}", flush=True)


def main(argv=None):
    """Prints each figure as soon as it is measured, so a run stopped at a time limit keeps what it
    finished: the machine's limits, then the train step, the sampler and the guided sampler."""
    args = parse_args(argv)
    on_gpu = jax.devices()[0].platform == "gpu"
    cfg = model_config(args.model, args.dtype)
    shape = Shape(args.rows, args.group_size, args.prompt_len, args.new_tokens, args.guide_len, args.micro_batch,
                  args.remat)
    peak = matmul_peak(args.dtype, args.matmul_size or (8192 if on_gpu else 2048))
    bandwidth = memory_bandwidth((args.bandwidth_mib or (2048 if on_gpu else 256)) << 20)
    _say(machine_lines(args.model, cfg, peak, bandwidth))
    _progress("machine limits measured")
    params = random_params(cfg)
    _progress("random parameters made")
    if args.skip != "train":
        _progress("train step: compile, warm-up and repeats")
        _say(train_lines(shape, peak, time_train_step(cfg, params, shape, args.repeats)))
    if args.skip != "decode":
        _progress("sampler: 1 and N new tokens")
        run = _sampler_call(cfg, params, shape)
        decode = time_decode(run, cfg, shape, args.repeats)
        _say(decode_lines(shape, peak, bandwidth, decode))
        _progress("guided sampler")
        _say(guided_lines(shape, decode, time_guided(run, shape, args.repeats)))


if __name__ == "__main__":
    main()
