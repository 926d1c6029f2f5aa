"""What a resumed run may change, the files a start leaves in its run directory, and the stop
requests (SIGTERM, SIGINT) after which a run saves and exits so that it can be resumed.

A resume compares the config saved with the checkpoint against the current one: keys that fix the
saved state's shapes, the meaning of the guidance state or the data order (`FIXED_ON_RESUME`) stop
the run with the list of them; other changes are logged and applied. Each start keeps its config
(`write_start_config`), and metrics.jsonl is cut back to the step resumed from (`truncate_metrics`).
A re-run of a finished run (`completed_step`) trains nothing and only writes a missing export.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Optional, Sequence

import jax
import ml_collections

from g2rpo_jax import train_state as train_state_lib

# Keys a resumed run may not change: they fix the shapes of the saved state (the model), what the
# guidance state means, or the data order the saved iterator position points into. An entry
# ending in '.' covers a whole section. Everything else (learning rate, total steps, sampling,
# rewards, mesh, ...) may change and is logged.
FIXED_ON_RESUME = (  # run.seed: the sampling keys come from the base key saved in the state
    "model.", "run.seed", "guidance.mode", "guidance.per_problem", "guidance.length_unit", "step.group_size", "data.source", "data.adapter", "data.split",
    "data.limit", "data.seed", "data.shuffle", "data.curriculum_key", "data.curriculum_order",
    "data.batch_size",
)
_ABSENT = "<absent>"
# Fixed keys added after runs that may still be resumed: absent in their configs means this value.
_ADDED_FIXED_DEFAULTS = {"guidance.per_problem": False, "guidance.length_unit": "tokens"}


def config_as_dict(cfg: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values (tuples become lists), as it is stored in checkpoints."""
    return json.loads(cfg.to_json_best_effort())


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim.learning_rate': 1e-4, ...}: nested dicts to dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for every key that differs or exists in one only."""
    old, new = flatten(saved), flatten(current)
    return {key: (old.get(key, _ABSENT), new.get(key, _ABSENT))
            for key in sorted(old.keys() | new.keys()) if old.get(key, _ABSENT) != new.get(key, _ABSENT)}


def fixed_changes(changes: dict[str, tuple[Any, Any]], guidance_mode: str) -> list[str]:
    """The changed keys a resume cannot accept (see FIXED_ON_RESUME), plus two that matter only
    in some settings: the size of the guidance mode's reward buffer (`guidance_mode`: the run's
    mode) and turning gradient clipping on or off both change the saved state's structure."""
    fixed = [key for key in changes
             if any(key == f or (f.endswith(".") and key.startswith(f)) for f in FIXED_ON_RESUME)
             and changes[key] != (_ABSENT, _ADDED_FIXED_DEFAULTS.get(key, _ABSENT))]
    for key, mode in (("guidance.window", "adaptive"), ("guidance.update_every", "ratio")):
        if key in changes and guidance_mode == mode:
            fixed.append(key)
    if "optim.max_grad_norm" in changes:
        old, new = changes["optim.max_grad_norm"]
        if not (isinstance(old, (int, float)) and isinstance(new, (int, float))) or (old > 0) != (new > 0):
            fixed.append("optim.max_grad_norm")
    return sorted(set(fixed))


def describe_changes(changes: dict[str, tuple[Any, Any]], keys: Sequence[str]) -> str:
    return ", ".join(f"{key} ({changes[key][0]!r} -> {changes[key][1]!r})" for key in keys)


def check_resume_config(saved: Optional[dict], current: dict, step: int, workdir: str) -> dict:
    """Raises ValueError listing the keys that differ from the checkpoint's config and cannot
    change on resume; returns all the differences otherwise."""
    if saved is None:
        return {}
    changes = config_changes(saved, current)
    fixed = fixed_changes(changes, current["guidance"]["mode"])
    if fixed:
        raise ValueError(
            f"cannot resume {workdir} from its checkpoint of step {step} with this config: "
            f"{describe_changes(changes, fixed)} differ from the run's and cannot change on resume. "
            f"Set them back (the run's config is in {os.path.join(workdir, 'config.json')}), or start a "
            f"new run with another run.workdir")
    return changes


def newest_saved_config(manager) -> tuple[Optional[int], Optional[dict]]:
    """(step, config) of the newest checkpoint whose host state reads back; a cheap JSON read
    that lets a config mismatch stop the run before any model is loaded."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, train_state_lib.restore_host_state(manager, step).get("config")
        except Exception:  # noqa: BLE001 -- damaged; the restore reports and skips it
            continue
    return None, None


def final_hf_dir(workdir: str) -> str:
    """Where a run exports its policy as a Hugging Face checkpoint at the end."""
    return os.path.join(workdir, "final_hf")


def completed_step(cfg: ml_collections.ConfigDict, manager) -> Optional[int]:
    """The newest checkpoint's step when it reaches run.total_steps (the run is finished), else None."""
    newest = manager.latest_step()
    return newest if newest is not None and newest >= cfg.run.total_steps else None


def final_export_missing(cfg: ml_collections.ConfigDict, workdir: str) -> bool:
    """Whether the run should end with a final_hf/ export that is absent or was cut short (save_hf
    writes config.json after the weights, the tokenizer files come last)."""
    final = final_hf_dir(workdir)
    return bool(cfg.run.save_hf_at_end) and not all(
        os.path.exists(os.path.join(final, name)) for name in ("config.json", "tokenizer_config.json"))


def complete_message(cfg: ml_collections.ConfigDict, workdir: str, step: int, with_export: bool) -> str:
    """What a re-run of a finished run says: nothing to train, and where its results are
    (`with_export`: its final_hf/ among them)."""
    outputs = [os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "checkpoints", str(step))]
    if with_export:
        outputs.append(final_hf_dir(workdir))
    return (f"the run in {workdir} is already complete at step {step} (run.total_steps={cfg.run.total_steps}); "
            f"nothing to do. Its outputs: {', '.join(outputs)}. To train further, raise --config.run.total_steps")


def write_start_config(workdir: str, cfg: ml_collections.ConfigDict, start_step: int) -> str:
    """Keeps this start's config: config.json for a run's first start, config.from_step_S.json for
    a resume from step S (.1, .2, ... when a step is resumed from more than once)."""
    if start_step == 0:
        path = os.path.join(workdir, "config.json")
    else:
        path = os.path.join(workdir, f"config.from_step_{start_step}.json")
        n = 0
        while os.path.exists(path):
            n += 1
            path = os.path.join(workdir, f"config.from_step_{start_step}.{n}.json")
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)
    return path


def truncate_metrics(path: str, last_step: int) -> int:
    """Drops the records of steps after `last_step` (written after the checkpoint being resumed
    from) and a last line cut short by a crash; rewrites the file atomically. Returns how many
    records were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    kept, dropped = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > last_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(path + ".tmp", path)
    return dropped


def remove_empty_run_dir(workdir: str) -> None:
    """Removes what a failed first start leaves: an empty checkpoints/ folder and, then empty, the
    run directory itself. Anything with content stays."""
    for path in (os.path.join(workdir, "checkpoints"), workdir):
        try:
            os.rmdir(path)
        except OSError:  # absent, or not empty
            pass


# ----------------------------------------------------------------------------- stop requests


class StopRequests:
    """SIGTERM and SIGINT as requests to stop: the first one lets the step in flight finish and
    asks the loop to save it and exit; a second one ends the process at once (the usual meaning of
    a repeated Ctrl-C or of a scheduler's follow-up SIGKILL). Handlers can only be installed from
    the main thread; elsewhere the signals keep their previous behaviour."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        # A handler may interrupt a print: write to the file descriptor, not through sys.stdout.
        if self.received is not None:
            os.write(1, f"[train] second {name}: exiting at once without saving\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = name
        os.write(1, f"[train] {name} received: finishing the step in flight, then saving it and exiting "
                    f"({name} again exits at once)\n".encode())

    def agreed(self) -> Optional[str]:
        """The signal's name when any host received one, else None: every host must stop after
        the same step, or the others would wait forever in the next step's collectives."""
        if jax.process_count() == 1:
            return self.received
        if train_state_lib.all_hosts_agree(self.received is None):
            return None
        return self.received or "a signal on another host"
