"""`python -m g2rpo_jax.plot`: the curves it draws are the metrics the runs logged, and the HTML
report it writes beside them holds the same figure, the config keys the runs differ in and the
runs' final numbers."""

import base64
import html.parser
import json

import numpy as np
import pytest

from g2rpo_jax import plot, plot_report


def write_run(path, records, tail="", config=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


class Page(html.parser.HTMLParser):
    """The parts of a report the tests read: every table (by class) as rows of cell texts, and
    the images' sources."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.images, self._table, self._cell = {}, [], None, None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("class"), [])
        elif tag == "tr":
            self._table.append([])
        elif tag in ("th", "td"):
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self._table[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def rl_records(rewards, length=0.0, time_s=0.5):
    return [{"step": s, "reward/mean": r, "accuracy/mean": r / 2, "guidance/length": length, "loss": 1.0 / s,
             "time/step_s": time_s} for s, r in enumerate(rewards, start=1)]


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
    assert (tmp_path / "compare.html").is_file()  # the report goes next to the PNG by default
    printed = capsys.readouterr()
    assert "2 panels (reward/mean, guidance/length)" in printed.out
    assert "[plot] warning: no run logged 'kl'" in printed.err  # a panel named by hand that matched nothing
    assert plot.unmatched_panel_warnings(["rewrd/mean", "reward/*"], {"grpo": grpo}) == [
        "no run logged 'rewrd/mean'; did you mean 'reward/mean'?"]
    assert plot.main(runs + ["--out", str(tmp_path / "only.png"), "--no_html"]) == 0
    assert (tmp_path / "only.png").is_file() and not (tmp_path / "only.html").exists()

    figure = plot.render({"grpo": grpo, "g2rpo_a": guided}, ["reward/mean", "guidance/length"])
    reward_axis, length_axis = figure.axes[:2]
    assert [line.get_label() for line in reward_axis.lines] == ["grpo", "g2rpo_a"]
    np.testing.assert_allclose(reward_axis.lines[1].get_ydata(), [r["reward/mean"] for r in guided])
    np.testing.assert_allclose(length_axis.lines[1].get_xdata(), steps)
    np.testing.assert_allclose(length_axis.lines[1].get_ydata(), 64 - steps)


def test_html_report_embeds_the_figure_and_tables_the_config_differences_and_final_numbers(tmp_path):
    base = {"optim": {"learning_rate": 1e-4, "b1": 0.9}, "step": {"loss_type": "grpo", "beta": 0.0},
            "guidance": {"mode": "none", "alpha": 0.0}, "run": {"seed": 0}, "data": {"tags": ["a", "b"]}}
    guided = json.loads(json.dumps(base))
    guided["guidance"] = {"mode": "<b>adaptive</b> & co", "alpha": 0.5}
    guided["optim"]["learning_rate"] = 1  # a number, differs from 1e-4; 0.0 vs 0 below does not differ
    guided["step"]["beta"] = 0
    guided["run"]["note"] = "only here"
    sft_config = json.loads(json.dumps(base))
    sft_config["step"]["loss_type"] = "sft"
    grpo = rl_records([0.0, 0.25, 0.5])
    adaptive = rl_records([0.25, 0.5, 0.75], length=12.0, time_s=1.5)
    adaptive[-1].update({"eval/heldout/pass@1": 0.375, "eval/heldout/seconds": 4.0, "eval/heldout/num_problems": 64})
    sft = [{"step": s, "reward/mean": 0.0, "loss": 2.0 / s, "time/step_s": 0.25} for s in (1, 2)]
    dirs = [write_run(tmp_path / "grpo", grpo, config=base), write_run(tmp_path / "g2rpo_a", adaptive, config=guided),
            write_run(tmp_path / "sft", sft, config=sft_config)]
    out = tmp_path / "plots" / "report.html"
    out.parent.mkdir()
    assert plot.main(dirs + ["--out", str(tmp_path / "plots" / "curves.png"), "--html", str(out),
                             "--panels", "reward/mean,loss"]) == 0
    text = out.read_text()
    page = Page(text)

    png = (tmp_path / "plots" / "curves.png").read_bytes()
    assert page.images == ["data:image/png;base64," + base64.b64encode(png).decode()]
    assert "<b>adaptive" not in text and "&lt;b&gt;adaptive&lt;/b&gt; &amp; co" in text

    header, *rows = page.tables["config-differences"]
    assert header == ["config key", "grpo", "g2rpo_a", "sft"]
    assert rows == [["guidance.alpha", "0", "0.5", "0"],
                    ["guidance.mode", "none", "<b>adaptive</b> & co", "none"],
                    ["optim.learning_rate", "0.0001", "1", "0.0001"],
                    ["run.note", "—", "only here", "—"],
                    ["step.loss_type", "grpo", "grpo", "sft"]]

    header, *rows = page.tables["final-numbers"]
    assert header == ["run", "steps", "last step", "reward", "accuracy", "ℓ", "loss", "eval/heldout/pass@1",
                      "time (s)"]
    table = {row[0]: dict(zip(header[1:], row[1:])) for row in rows}
    assert list(table) == ["grpo", "g2rpo_a", "sft"]
    for label, records in (("grpo", grpo), ("g2rpo_a", adaptive)):
        last = records[-1]
        assert table[label]["steps"] == table[label]["last step"] == "3"
        for column, key in (("reward", "reward/mean"), ("accuracy", "accuracy/mean"), ("ℓ", "guidance/length"),
                            ("loss", "loss")):
            assert float(table[label][column]) == pytest.approx(last[key], rel=1e-3)
    assert float(table["g2rpo_a"]["eval/heldout/pass@1"]) == 0.375 and table["grpo"]["eval/heldout/pass@1"] == "—"
    assert float(table["g2rpo_a"]["time (s)"]) == pytest.approx(3 * 1.5 + 4.0)  # steps plus the evaluation
    assert float(table["grpo"]["time (s)"]) == pytest.approx(1.5)
    assert table["sft"]["reward"] == table["sft"]["accuracy"] == "—"  # SFT scores no rollouts
    assert float(table["sft"]["loss"]) == 1.0 and table["sft"]["steps"] == "2"


def test_config_differences_flatten_dotted_keys_and_skip_runs_without_config():
    configs = {"a": {"optim": {"learning_rate": 1e-3, "eps": 1e-8}, "mesh": {"rules": [["batch", None]]}},
               "b": {"optim": {"learning_rate": 3e-4, "eps": 1e-8}, "mesh": {"rules": [["batch", "data"]]}},
               "c": None}
    differences = plot_report.config_differences(configs)
    assert list(differences) == ["mesh.rules", "optim.learning_rate"]
    assert differences["optim.learning_rate"] == {"a": 1e-3, "b": 3e-4}
    assert plot_report.config_differences({"a": configs["a"], "c": None}) == {}
    assert "No config.json in: c" in plot_report.differences_table(configs)


def test_sft_runs_draw_no_reward_line(tmp_path):
    records = [{"step": s, "reward/mean": 0.0, "accuracy/mean": 0.0, "loss": 1.0 / s} for s in (1, 2, 3)]
    sft = plot.load_run(write_run(tmp_path / "sft", records, config={"step": {"loss_type": "sft"}}), "sft")
    grpo = plot.load_run(write_run(tmp_path / "grpo", rl_records([0.0, 0.5, 1.0]),
                                   config={"step": {"loss_type": "grpo"}}), "grpo")
    assert not sft.has_reward and grpo.has_reward
    # Without a config, a run that logged no `reward/*` key has no reward either.
    assert not plot.has_reward([{"step": 1, "loss": 1.0}], None)
    runs = {"sft": sft.records, "grpo": grpo.records}
    figure = plot.render(runs, ["reward/mean", "accuracy/mean", "loss"], without_reward={"sft"})
    reward_axis, accuracy_axis, loss_axis = figure.axes[:3]
    assert [line.get_label() for line in reward_axis.lines] == ["grpo"]
    assert [line.get_label() for line in accuracy_axis.lines] == ["grpo"]
    assert [line.get_label() for line in loss_axis.lines] == ["sft", "grpo"]
    # A reward panel only the SFT run logged is left out altogether.
    assert plot.expand_panels(["reward/*", "loss"], {"sft": sft.records}, {"sft"}) == ["loss"]


def test_steps_are_integer_ticks_and_identical_runs_stay_distinguishable():
    records = [{"step": s, "loss": 0.5} for s in (1, 2, 3)]  # a short range where ticks would fall on halves
    figure = plot.render({"a": records, "b": list(records), "c": list(records)}, ["loss"])
    axis = figure.axes[0]
    ticks = axis.get_xticks()
    assert len(ticks) >= 2 and np.all(ticks == np.round(ticks))
    lines = axis.lines
    styles = {(line.get_linestyle(), line.get_marker(), line.get_color()) for line in lines}
    assert len(styles) == 3 and len({line.get_linestyle() for line in lines}) == 3
    assert len({line.get_marker() for line in lines}) == 3
    for line in lines:  # the data is drawn as logged, no offsets
        np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
        np.testing.assert_array_equal(line.get_ydata(), [0.5, 0.5, 0.5])
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["a", "b", "c"]


def test_labels_are_the_shortest_unique_path_suffixes(tmp_path):
    assert plot.run_labels(["runs/grpo/seed0", "runs/naive/seed0", "runs/sft"]) == ["grpo/seed0", "naive/seed0", "sft"]
    assert plot.run_labels(["runs/a", "runs/a/"]) == ["a", "a'"]


def test_missing_empty_or_corrupt_runs_are_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere/metrics.jsonl does not exist"):
        plot.main([str(tmp_path / "nowhere")])
    run = write_run(tmp_path / "run", [{"step": 1, "loss": 1.0}])
    assert plot.main([run, "--panels", "reward/mean"]) == 2
    assert "none of the panels 'reward/mean'" in capsys.readouterr().err
    broken = write_run(tmp_path / "broken", [{"step": 1}], tail="not json\n{\"step\": 2}\n")
    with pytest.raises(ValueError, match=r"broken/metrics.jsonl:2 is not a JSON object"):
        plot.read_metrics(broken)
    with pytest.raises(ValueError, match=r"listed/metrics.jsonl:2 is not a JSON object"):
        plot.read_metrics(write_run(tmp_path / "listed", [{"step": 1}, [1, 2]]))
    empty = write_run(tmp_path / "empty", [])
    with pytest.raises(ValueError, match=r"empty/metrics.jsonl is empty; the run .*empty has logged no"):
        plot.main([run, empty])
    cut = write_run(tmp_path / "cut", [], tail='{"step": 1, "lo')
    with pytest.raises(ValueError, match=r"cut/metrics.jsonl is empty"):
        plot.main([cut])
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"binary/metrics.jsonl is not a text file"):
        plot.main([str(tmp_path / "binary")])
