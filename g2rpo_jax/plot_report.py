"""The HTML page `python -m g2rpo_jax.plot` writes next to its PNG: one self-contained file with
the figure inlined, the config keys the runs differ in and each run's final numbers.

Pure functions over plain data (configs as nested dicts, numbers as dicts, images as PNG bytes);
every string that reaches the page goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from typing import Mapping, Optional, Sequence

MISSING = object()  # a key one run's config has and another's lacks
EMPTY_CELL = "—"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """A nested config as one level of dotted keys ({'optim': {'b1': 0.9}} -> {'optim.b1': 0.9});
    lists and empty dicts are values."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(configs: Mapping[str, Optional[Mapping]]) -> dict[str, dict[str, object]]:
    """The dotted keys whose values are not the same in every config, sorted, each with its value
    per run (MISSING where a config lacks the key). Runs without a config (None) take no part;
    fewer than two configs have no differences."""
    flat = {label: flatten(config) for label, config in configs.items() if config is not None}
    if len(flat) < 2:
        return {}
    keys = sorted({key for values in flat.values() for key in values})
    differences = {}
    for key in keys:
        values = {label: values.get(key, MISSING) for label, values in flat.items()}
        first = next(iter(values.values()))
        if any(not same(first, value) for value in values.values()):
            differences[key] = values
    return differences


def same(a: object, b: object) -> bool:
    """Whether two config values are equal: 1 and 1.0 are, True and 1 are not."""
    if a is MISSING or b is MISSING or isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def format_value(value: object) -> str:
    """A cell's text: numbers to 4 significant digits, strings as they are (an empty one as ""),
    lists and the rest as JSON; absent and None as a dash."""
    if value is MISSING or value is None:
        return EMPTY_CELL
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value, ensure_ascii=False)


def table(header: Sequence[str], rows: Sequence[Sequence[object]], css_class: str) -> str:
    """An HTML table; the first cell of each row is a row header. Every cell is escaped."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr><th>" + html.escape(format_value(row[0])) + "</th>"
        + "".join(f"<td>{html.escape(format_value(cell))}</td>" for cell in row[1:]) + "</tr>\n"
        for row in rows)
    return f'<table class="{html.escape(css_class)}">\n<tr>{head}</tr>\n{body}</table>'


def differences_table(configs: Mapping[str, Optional[Mapping]]) -> str:
    """The config differences as rows of key | value per run, or a sentence why there are none."""
    differences = config_differences(configs)
    without = [label for label, config in configs.items() if config is None]
    note = (f"<p>No config.json in: {html.escape(', '.join(without))}.</p>\n" if without else "")
    compared = [label for label in configs if label not in without]
    if not differences:
        reason = "fewer than two runs have a config.json" if len(compared) < 2 else "the configs are identical"
        return note + f"<p>No differences: {html.escape(reason)}.</p>"
    rows = [[key, *(values[label] for label in compared)] for key, values in differences.items()]
    return note + table(["config key", *compared], rows, "config-differences")


def numbers_table(numbers: Mapping[str, Mapping[str, object]]) -> str:
    """Each run's final numbers as one row; the columns are every name any run has, in order."""
    columns: list[str] = []
    for row in numbers.values():
        columns += [name for name in row if name not in columns]
    rows = [[label, *(row.get(name) for name in columns)] for label, row in numbers.items()]
    return table(["run", *columns], rows, "final-numbers")


def image_tag(png: bytes, caption: str) -> str:
    """An <img> carrying the PNG itself as a data: URL, so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'


STYLE = """body{font-family:sans-serif;max-width:1400px;margin:2em auto;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:.25em .6em}
td{text-align:right;font-family:monospace}th{text-align:left;background:#f4f4f4}img{max-width:100%}
code{background:#f4f4f4;padding:0 .2em}"""


def page(runs: Sequence[tuple[str, str, Optional[Mapping]]], numbers: Mapping[str, Mapping[str, object]],
         images: Sequence[tuple[str, bytes]]) -> str:
    """The whole report. `runs`: (label, directory, config or None) per run; `numbers`: final
    numbers per label; `images`: (caption, PNG bytes) per figure."""
    labels = [label for label, _, _ in runs]
    listing = "".join(f"<li><b>{html.escape(label)}</b>: <code>{html.escape(directory)}</code></li>"
                      for label, directory, _ in runs)
    figures = "\n".join(f"<figure>{image_tag(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
                        for caption, png in images)
    title = html.escape("Training curves: " + ", ".join(labels))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head><body>
<h1>{title}</h1>
<ul>{listing}</ul>
<h2>Final numbers</h2>
<p>The last logged value of each metric; reward and accuracy are left out for runs that score no
rollouts (SFT). Time is the sum of the logged step and evaluation times.</p>
{numbers_table(numbers)}
<h2>Config differences</h2>
<p>The config.json keys whose values are not the same in every run.</p>
{differences_table({label: config for label, _, config in runs})}
<h2>Curves</h2>
{figures}
</body></html>
"""
