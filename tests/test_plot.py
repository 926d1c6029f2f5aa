"""`python -m g2rpo_jax.plot`: the curves it draws are the metrics the runs logged."""

import json

import numpy as np
import pytest

from g2rpo_jax import plot


def write_run(path, records, tail=""):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return str(path)


def test_series_sorts_by_step_and_the_last_record_of_a_step_wins():
    records = [{"step": 2, "loss": 0.5}, {"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.4},  # resumed at 2
               {"step": 3}, {"step": 4, "loss": float("nan")}, {"step": 5, "loss": 0.1}]
    assert plot.series(records, "loss") == ([1, 2, 5], [0.9, 0.4, 0.1])


def test_panel_patterns_match_one_path_segment_and_keep_only_logged_metrics():
    runs = {"a": [{"step": 1, "eval/math500/pass@1": 0.1, "eval/aime24/pass@1": 0.0, "eval/average/pass@1": 0.05,
                   "eval/math500/pass@4": 0.2, "kl": 0.0}]}
    panels = plot.expand_panels(["reward/mean", "eval/*/pass@1", "kl"], runs)
    assert panels == ["eval/aime24/pass@1", "eval/average/pass@1", "eval/math500/pass@1", "kl"]


def test_cli_draws_every_run_on_every_panel(tmp_path, capsys):
    steps = np.arange(1, 11)
    rng = np.random.default_rng(0)
    grpo = [{"step": int(s), "reward/mean": float(r), "guidance/length": 0.0} for s, r in zip(steps, rng.random(10))]
    guided = [{"step": int(s), "reward/mean": float(r), "guidance/length": float(64 - s)}
              for s, r in zip(steps, rng.random(10))]
    # A crash can leave the last line unfinished; it is skipped.
    runs = [write_run(tmp_path / "grpo", grpo), write_run(tmp_path / "g2rpo_a", guided, tail='{"step": 11, "rew')]
    out = tmp_path / "compare.png"
    assert plot.main(runs + ["--out", str(out), "--panels", "reward/mean,guidance/length,kl"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 panels (reward/mean, guidance/length)" in capsys.readouterr().out

    figure = plot.render({"grpo": grpo, "g2rpo_a": guided}, ["reward/mean", "guidance/length"])
    reward_axis, length_axis = figure.axes[:2]
    assert [line.get_label() for line in reward_axis.lines] == ["grpo", "g2rpo_a"]
    np.testing.assert_allclose(reward_axis.lines[1].get_ydata(), [r["reward/mean"] for r in guided])
    np.testing.assert_allclose(length_axis.lines[1].get_xdata(), steps)
    np.testing.assert_allclose(length_axis.lines[1].get_ydata(), 64 - steps)


def test_missing_run_and_unknown_panels_are_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere/metrics.jsonl does not exist"):
        plot.main([str(tmp_path / "nowhere")])
    run = write_run(tmp_path / "run", [{"step": 1, "loss": 1.0}])
    assert plot.main([run, "--panels", "reward/mean"]) == 2
    assert "none of the panels 'reward/mean'" in capsys.readouterr().err
    broken = write_run(tmp_path / "broken", [{"step": 1}], tail="not json\n{\"step\": 2}\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON object"):
        plot.read_metrics(broken)
