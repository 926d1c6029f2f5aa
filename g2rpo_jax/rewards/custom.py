"""A reward function of the user's, named in the config (`rewards.custom`) and added to the total.

    --config.rewards.custom=my_package.rewards:length_penalty      # an importable module
    --config.rewards.custom=experiments/my_reward.py:brevity         # a file (path from the working dir)
    --config.rewards.weights.custom=0.5                              # its weight in the total

The function is called on the host, once per batch of completions, as `fn(completions, examples)`:
`completions` a list of N decoded strings, `examples` the N matching `g2rpo_jax.data.Example`
records (prompt, answer or tests, reference trajectory, metadata). It returns N finite numbers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import re
import sys
from typing import Any, Callable, Sequence

import numpy as np

SPEC_FORM = "'package.module:function' or 'path/to/file.py:function'"


@functools.lru_cache(maxsize=None)
def load_reward_function(spec: str) -> Callable[[list[str], list[Any]], Sequence[float]]:
    """The callable `spec` names ('package.module:function', or 'path/to/file.py:function' with the
    path taken from the working directory). Raises ValueError naming the spec and what is wrong."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ValueError(f"rewards.custom={spec!r} is not {SPEC_FORM}")
    if target.endswith(".py") or "/" in target or os.sep in target:
        if not os.path.isfile(target):
            raise ValueError(f"rewards.custom={spec!r}: no file {target!r} (relative to {os.getcwd()})")
        # Registered under a name of its own before it runs, as an import would be (dataclasses and
        # pickling look a class's module up in sys.modules).
        module_name = "_g2rpo_reward_" + re.sub(r"\W", "_", os.path.abspath(target))
        file_spec = importlib.util.spec_from_file_location(module_name, target)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[module_name] = module
        file_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise ValueError(f"rewards.custom={spec!r}: module {target!r} could not be imported ({error}; is "
                             f"its folder on PYTHONPATH?); give {SPEC_FORM}") from error
    if not hasattr(module, name):
        raise ValueError(f"rewards.custom={spec!r}: {target!r} has no function {name!r}")
    function = getattr(module, name)
    if not callable(function):
        raise ValueError(f"rewards.custom={spec!r}: {target}.{name} is a {type(function).__name__}, not a function")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have none: the first call decides
        return function
    try:
        signature.bind([], [])
    except TypeError:
        raise ValueError(f"rewards.custom={spec!r}: {name}{signature} cannot be called as "
                         f"{name}(completions, examples)") from None
    return function


def custom_rewards(spec: str, completions: Sequence[str], examples: Sequence[Any]) -> np.ndarray:
    """float32 [N]: the function `spec` names applied to the batch. Raises ValueError naming the spec
    when the function raises, or does not return one finite number per completion."""
    function = load_reward_function(spec)
    try:
        values = function(list(completions), list(examples))
    except Exception as error:  # noqa: BLE001 (the user's code: say whose it is, keep its traceback)
        raise ValueError(f"rewards.custom={spec!r} raised {type(error).__name__}: {error}") from error
    if values is None:
        raise ValueError(f"rewards.custom={spec!r} returned None (a missing return?); it must return one number "
                         "per completion")
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nesting
        array = np.asarray(values, dtype=object)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"rewards.custom={spec!r} returned {array.dtype} values, not numbers: it must return "
                         "one number per completion")
    array = array.astype(np.float64)
    if array.shape != (len(completions),):
        raise ValueError(f"rewards.custom={spec!r} returned shape {array.shape} for {len(completions)} "
                         f"completions; it must return one number per completion")
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"rewards.custom={spec!r} returned {array[bad]} for completion {bad}; rewards must "
                         "be finite")
    return array.astype(np.float32)
