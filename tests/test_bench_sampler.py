"""experiments/benchmarks/sampler.py --quick runs end to end against transformers and ends in its ratio lines.

Only the transformers peer: the Tunix peer needs its own venv, which the tests never build."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = re.compile(r"^(.+) tokens-per-second ratio: (\S+)$")


@pytest.mark.slow
def test_quick_run_against_transformers_prints_both_ratio_lines():
    env = dict(os.environ)
    # One CPU device, as a user's run has, and XLA's cheapest code generation: this checks the
    # script's path, not its speed, and most of its time is compiling the sampler.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, os.path.join("experiments", "benchmarks", "sampler.py"), "--quick", "--peers", "transformers"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert "tunix: not measured (not in --peers)" in lines
    ratios = {m.group(1): m.group(2) for m in map(RATIO.match, lines) if m}
    assert set(ratios) == {"sampler/transformers", "rl-shaped sampler/transformers"}, result.stdout
    for name, value in ratios.items():
        assert re.fullmatch(r"\d+\.\d\d", value) and float(value) > 0, f"{name}: {value}"
    assert RATIO.match(lines[-1]) and RATIO.match(lines[-2]), "the ratio lines must be the last lines"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_sampler", os.path.join(REPO, "experiments", "benchmarks", "sampler.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_mistakes_name_the_flag_the_value_and_the_fix(capsys):
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--peers", "transformers,vllm"])
    assert "--peers vllm: unknown peer; valid peers are transformers, tunix" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--batch", "60"])
    assert "--group-size 8 must be at least 4 (a quarter of each group is guided) and divide --batch 60" in (
        capsys.readouterr().err)
    args = script.parse_args(["--quick", "--new-tokens", "32"])
    assert (args.model, args.batch, args.new_tokens, args.repeats, args.peers) == (
        "tiny", 16, 32, 1, ("transformers", "tunix"))
