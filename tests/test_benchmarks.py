"""experiments/benchmarks/rl_step.py: our side of the RL-step benchmark end to end in --quick mode,
without TRL's venv (the tests never build it), its flag errors and its shared tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "benchmarks", "rl_step.py")
CELL = re.compile(r"(\d+\.\d\d) \[(\d+\.\d\d)-(\d+\.\d\d)\]")


def load_script():
    spec = importlib.util.spec_from_file_location("bench_rl_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_without_the_trl_venv_skips_the_peer_and_reports_our_stage_times(tmp_path):
    env = dict(os.environ)
    # XLA's cheapest code generation: this checks the script's path, not its speed, and most of
    # its time is compiling the sampler and the train step.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["HF_HUB_OFFLINE"] = "1"
    missing = tmp_path / "no-venv" / "bin" / "python"
    figures = tmp_path / "rl_step.json"
    result = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--trl-python", str(missing), "--json", str(figures)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"TRL peer skipped: {missing} does not exist") for line in lines), result.stdout
    assert not any("ratio:" in line for line in lines), "no peer, so no ratio line"

    # The table: one row for our side, cells 'median [min-max]' per stage, reference 'none' at β = 0.
    header = next(i for i, line in enumerate(lines) if line.split()[:6] == ["side", "generation", "rewards",
                                                                             "reference", "train", "step"])
    row = lines[header + 1]
    assert row.split()[0] == "ours" and " none " in row, row
    cells = [tuple(map(float, c)) for c in CELL.findall(row)]
    assert len(cells) == 4, row  # generation, rewards, train, step
    generation, rewards, train, step = (median for median, _, _ in cells)
    assert all(low <= median <= high for median, low, high in cells)
    assert generation > 0 and train > 0 and step > 0
    assert generation + rewards + train == pytest.approx(step, abs=0.02)  # train is the rest of the step
    assert float(row.split()[-1]) > 0  # peak RSS, GiB

    # The same figures in --json: one warm-up and one measured step of the tiny model.
    with open(figures) as f:
        report = json.load(f)
    (entry,) = report["results"]
    assert entry["config"] == "tiny-b0" and "trl" not in entry
    assert len(entry["ours"]["steps"]) == 2
    measured = entry["ours"]["steps"][1]
    assert measured["reference"] is None
    assert measured["step"] == pytest.approx(step, abs=0.006)
    assert entry["ours"]["summary"]["generation"]["median"] == pytest.approx(generation, abs=0.006)
    assert entry["ours"]["peak_rss_kib"] > 0


def test_flag_mistakes_name_the_value_and_the_valid_ones(capsys):
    script = load_script()
    with pytest.raises(SystemExit):
        script.main(["--configs", "512x8-b0,1024x16-b0"])
    err = capsys.readouterr().err
    assert "'1024x16-b0' is not a known configuration; valid: 256x4-b0, 256x4-b0.04, 512x8-b0" in err
    with pytest.raises(SystemExit):
        script.main(["--steps", "0"])
    assert "--steps=0 is not valid; valid: an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--cores", "100000"])
    assert "--cores=100000 is not valid; valid: 1 to" in capsys.readouterr().err


def test_the_shared_tokenizer_is_qwen3_cut_to_32000_tokens(tmp_path):
    from g2rpo_jax import models

    script = load_script()
    cut = models.load_tokenizer(script.build_tokenizer(str(tmp_path / "tokenizer")))
    full = models.load_tokenizer(models.qwen3_tokenizer_dir())
    assert len(cut) == 32000
    assert (cut.eos_token, cut.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert [cut.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        31997, 31998, 31999]
    # Text made of kept tokens tokenizes exactly as with the whole Qwen3 tokenizer.
    text = "Question:\nthe quick brown cat runs over the lazy dog, 12 times.\n\nAnswer:\n"
    ids = full.encode(text)
    assert max(ids) < 31997
    assert cut.encode(text) == ids and cut.decode(ids) == text
    # A word whose token was cut falls back to smaller kept tokens and still decodes to itself.
    assert max(full.encode(" fox")) >= 31997
    assert max(cut.encode(" fox")) < 31997 and cut.decode(cut.encode(" fox")) == " fox"
    assert script.trivial_reward("eee a") == 1.0 and script.trivial_reward("banana") == 0.0
