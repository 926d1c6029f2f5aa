"""Reading records from local files or Hugging Face dataset names, then adapting them."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
from typing import Iterator

from g2rpo_jax.data.adapters import Adapter, get_adapter
from g2rpo_jax.data.example import Example
from g2rpo_jax.paths import relative_hint

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
OFFLINE_HINT = (
    "download the dataset file (jsonl/json/parquet) and pass its local path as the source, or, "
    "if the dataset is already in the Hugging Face cache, set HF_DATASETS_OFFLINE=1 (and "
    "HF_HUB_OFFLINE=1) so that `datasets` reads the cache without contacting the hub"
)


def _looks_local(source: str) -> bool:
    return os.path.exists(source) or source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~"))


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _read_json_or_jsonl(path: str) -> Iterator[dict]:
    """A .json file holds one array (or {"data": [...]}); some .json files are really jsonl."""
    with _open_text(path) as handle:
        text = handle.read()
    if path.endswith((".json", ".json.gz")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # fall through to line-by-line parsing
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, list):
            yield from data
            return
        if data is not None:
            raise ValueError(f"source={path!r}: a .json file must hold a list of records, got {type(data).__name__}")
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"source={path!r}: line {line_number} is not valid JSON ({error})") from error


def _read_parquet(path: str) -> Iterator[dict]:
    try:
        import pyarrow.parquet as parquet  # lazy: only parquet sources need it
    except ImportError as error:
        raise ImportError(
            f"source={path!r} is a parquet file, which needs the 'pyarrow' package: pip install pyarrow"
        ) from error
    yield from parquet.read_table(path).to_pylist()


def _read_hub(name: str, split: str | None) -> Iterator[dict]:
    """`name` or `name:config` (hub names never contain ':'), read with the `datasets` package."""
    if os.path.isdir(name):
        path, config = name, ""
    else:
        path, _, config = name.partition(":")
    try:
        import datasets  # lazy: heavy, and optional for users with local files
    except ImportError as error:
        raise ImportError(
            f"source={name!r} is a Hugging Face dataset name or dataset directory; reading it "
            f"needs the 'datasets' package (pip install datasets); or {OFFLINE_HINT}"
        ) from error
    try:
        dataset = datasets.load_dataset(path, config or None, split=split or "train")
    except Exception as error:  # the hub raises many types (connection, offline, not found)
        raise ValueError(
            f"source={name!r} (split={split or 'train'!r}) could not be loaded from the Hugging Face "
            f"hub or cache ({type(error).__name__}: {error}); {OFFLINE_HINT}"
        ) from error
    yield from dataset


def read_records(source: str, split: str | None = None) -> Iterator[dict]:
    """Raw records from a local .jsonl/.jsonl.gz/.json/.json.gz/.parquet file, a local dataset
    directory (e.g. a downloaded hub snapshot) or a hub name ('name' or 'name:config').

    `split` selects a split of a hub dataset or directory (default 'train'); a local file is one
    split already, so giving one for a file is an error rather than being ignored.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"source={source!r}: give a local file path or a Hugging Face dataset name")
    if not _looks_local(source):
        return _read_hub(source, split)
    path = os.path.expanduser(source)
    if os.path.isdir(path):  # e.g. a downloaded hub snapshot: `datasets` finds its data files
        return _read_hub(path, split)
    if split:
        raise ValueError(
            f"split={split!r} applies to Hugging Face dataset names only; source={source!r} is a "
            "local file (leave split empty)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source={source!r}: no such file{relative_hint(source)}")
    if path.endswith(".parquet"):
        return _read_parquet(path)
    if path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return _read_json_or_jsonl(path)
    raise ValueError(f"source={source!r}: unsupported file type; valid suffixes are {LOCAL_SUFFIXES}")


def load_examples(
    source: str,
    adapter: str | Adapter,
    split: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Reads `source`, adapts every record and keeps the first `limit` usable examples.

    Records the adapter rejects (returns None for) are skipped and the count is logged. Examples
    without an id get '<file or dataset name>/<row>'.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit!r} must be None or >= 0")
    adapt = get_adapter(adapter)
    default_prefix = os.path.basename(source) if _looks_local(source) else source
    examples: list[Example] = []
    skipped = 0
    for row, record in enumerate(read_records(source, split)):
        if limit is not None and len(examples) >= limit:
            break
        try:
            example = adapt(record)
        except ValueError as error:
            raise ValueError(f"source={source!r} row {row}: {error}") from error
        if example is None:
            skipped += 1
            continue
        if not example.id:
            example = dataclasses.replace(example, id=f"{default_prefix}/{row}")
        examples.append(example)
    if skipped:
        logger.warning(
            "load_examples(%r, adapter=%r): skipped %d record(s) the adapter could not use; kept %d",
            source, getattr(adapt, "__name__", adapt), skipped, len(examples),
        )
    return examples

