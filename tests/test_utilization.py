"""The FLOP and byte counts (g2rpo_jax.flops) against the model's own arrays, and the GPU
check script's dry run (the same steps on tiny shapes, on this machine's device)."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from g2rpo_jax import flops, models, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "benchmarks"))
import utilization  # noqa: E402


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_parameters_are_the_models_matrices(tied):
    """Every parameter is a decoder matmul, the LM head, the input embedding (a gather, counted
    by the head when tied) or a norm scale (a vector)."""
    cfg = models.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_layers=3, num_heads=4,
                             num_kv_heads=2, head_dim=16, tie_word_embeddings=tied)
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)]
    vectors = sum(size for size, leaf in zip(sizes, jax.tree.leaves(shapes)) if leaf.ndim == 1)
    body, head = flops.matmul_parameters(cfg)
    input_embedding = 0 if tied else cfg.vocab_size * cfg.hidden_size
    assert body + head + input_embedding + vectors == sum(sizes)
    assert head == cfg.vocab_size * cfg.hidden_size


def test_decode_bytes_are_the_parameters_and_the_cache_read():
    cfg = utilization.model_config("tiny", "float32")
    rows, context = 3, 10
    cache = models.init_cache(cfg, rows, context)
    cache_bytes = sum(x.nbytes for x in cache.k + cache.v)
    body, head = flops.matmul_parameters(cfg)
    step_flops, read = flops.decode_step_cost(cfg, rows, context, itemsize=4)
    assert read == (body + head) * 4 + cache_bytes
    # 2 FLOPs per weight and row, plus q·k and p·v over the context for every head.
    assert step_flops == rows * (2 * (body + head) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context)


def test_gpu_check_dry_run_prints_every_figure(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as on a one-GPU machine
    result = subprocess.run(["bash", os.path.join(REPO, "experiments", "benchmarks", "gpu_check.sh"), "--dry",
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "gpu_check_summary.txt").read_text()
    for name in ("train-step MFU", "decode memory roofline", "decode floor share"):
        value = re.search(rf"^{name}: (-?\d+)%$", summary, re.M)
        assert value, f"{name} missing from:\n{summary}"
    assert re.search(r"guided/unguided time: \d+\.\d\d", summary)
    assert "model: tiny float32" in summary and (tmp_path / "gpu_check.log").exists()


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_train_step_flops_agree_with_xlas_count_of_the_objectives_forward_and_backward():
    """XLA's count also holds the elementwise work (norms, softmax, activations), a few FLOPs per
    element against 2 × hidden per weight matmul: with hidden 256 that is a few percent."""
    cfg = models.ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=64, tie_word_embeddings=True)
    params = models.init_params(cfg, jax.random.key(0))
    rows, prompt_len, completion_len = 4, 24, 40
    tokens = jax.numpy.ones((rows, prompt_len + completion_len), jax.numpy.int32)

    def objective(params):
        hidden = models.hidden_states(cfg, params, tokens)[:, prompt_len - 1:-1]
        return models.token_logprobs(cfg, params, hidden, tokens[:, prompt_len:], chunk_size=completion_len).sum()

    forward = flops.train_step_flops(cfg, rows, prompt_len, completion_len) / 3
    assert xla_flops(objective, params) == pytest.approx(forward, rel=0.05)
    assert xla_flops(jax.grad(objective), params) == pytest.approx(3 * forward, rel=0.05)

    # Groups of 2 rows sharing their prompt, as the train step runs them (shared_prompts=True).
    batch = train_step.make_batch(tokens[:, :prompt_len], tokens[:, :prompt_len], tokens[:, prompt_len:],
                                  tokens[:, prompt_len:], jax.numpy.zeros(rows))

    def shared_objective(params):
        return train_step.compute_logprobs(cfg, params, batch, chunk_size=completion_len, shared_prompt_group=2).sum()

    shared_forward = flops.train_step_flops(cfg, rows, prompt_len, completion_len, shared_prompt_group=2) / 3
    assert shared_forward < 0.85 * forward
    assert xla_flops(shared_objective, params) == pytest.approx(shared_forward, rel=0.05)
    assert xla_flops(jax.grad(shared_objective), params) == pytest.approx(3 * shared_forward, rel=0.05)
