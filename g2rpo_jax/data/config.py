"""The data section of the config, and the two calls that turn it into prompts and an iterator."""

from __future__ import annotations

from typing import Any

from ml_collections import config_dict

from g2rpo_jax.data.iterator import BatchIterator, curriculum_ranks
from g2rpo_jax.data.loading import load_examples
from g2rpo_jax.data.prompts import PreparedPrompts, PromptSettings, prepare_prompts


def get_default_config() -> config_dict.ConfigDict:
    cfg = config_dict.ConfigDict()
    cfg.source = ""            # local .jsonl/.json/.jsonl.gz/.parquet path or HF name ('name:config')
    cfg.adapter = "math"       # a key of g2rpo_jax.data.ADAPTERS
    cfg.split = ""             # HF split ('' = 'train'); must stay '' for local files
    cfg.limit = 0              # keep the first N usable examples (0 = all)
    # template, system, instruction, enable_thinking, max_prompt_tokens (0 = no limit), overlong:
    # see PromptSettings. Prompts over the limit are counted, logged and reported.
    cfg.update(PromptSettings(max_prompt_tokens=1024).as_config())
    cfg.seed = 0               # shuffle seed (each epoch folds in its number)
    cfg.shuffle = True
    cfg.curriculum_key = ""    # '' = off; 'source', 'difficulty' or a metadata field
    cfg.curriculum_order = ()  # key values easiest first; () = natural sort order
    cfg.batch_size = 8         # prompts per step over all hosts (before repeating G per prompt)
    return cfg


def prepare_from_config(cfg: config_dict.ConfigDict, tokenizer: Any) -> PreparedPrompts:
    """Loads, adapts and tokenizes the configured dataset, applying the length policy."""
    examples = load_examples(cfg.source, cfg.adapter, split=cfg.split or None, limit=cfg.limit or None)
    if not examples:
        raise ValueError(f"data.source={cfg.source!r} (data.adapter={cfg.adapter!r}, data.split={cfg.split!r}) holds "
                         "no examples: the file is empty or the split has no rows; point data.source at the data")
    prepared = prepare_prompts(examples, tokenizer, PromptSettings.from_config(cfg, "data"))
    if not len(prepared):
        raise ValueError(f"all {len(examples)} prompts of data.source={cfg.source!r} are longer than "
                         f"data.max_prompt_tokens={cfg.max_prompt_tokens} tokens and data.overlong='drop' removed "
                         "them; raise data.max_prompt_tokens or set data.overlong='truncate_left'")
    return prepared


def iterator_from_config(
    cfg: config_dict.ConfigDict,
    prepared: PreparedPrompts,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """A batch iterator over row indices of `prepared` (look up examples/ids by index)."""
    ranks = None
    if cfg.curriculum_key:
        ranks = curriculum_ranks(prepared.examples, cfg.curriculum_key, tuple(cfg.curriculum_order))
    return BatchIterator(
        range(len(prepared)),
        cfg.batch_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        ranks=ranks,
        process_index=process_index,
        process_count=process_count,
    )
