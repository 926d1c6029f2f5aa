"""Mistakes a run would otherwise carry silently or report late: rollouts longer than the model's
positions, guides capped by the completion budget, empty run directories left by a failed start,
damaged checkpoints, checkpoints without a tokenizer, empty data."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import ml_collections
import pytest

from g2rpo_jax import data, guidance, models, resume, rollout, train
from tests.stand_in import CHAR_TOKENIZER
from tests.test_train import demo_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random-init checkpoint with the demo's character-level tokenizer beside its weights."""
    path = str(tmp_path_factory.mktemp("startup_model"))
    tokenizer = models.load_tokenizer(CHAR_TOKENIZER)
    return models.write_random_checkpoint(path, models.tiny_config_for(tokenizer), tokenizer_dir=CHAR_TOKENIZER)


def settings(mode="adaptive", placement="completion", max_length=50, initial_length=24, max_new_tokens=68):
    gcfg = guidance.get_default_config()
    gcfg.update({"mode": mode, "placement": placement, "max_length": max_length, "initial_length": initial_length})
    return gcfg, ml_collections.ConfigDict({"max_new_tokens": max_new_tokens})


def test_positions_count_prompt_hint_and_completion_budget():
    prompts = [[1] * 30, [1] * 12]
    needed, how = rollout.positions_needed(prompts, *settings(max_new_tokens=68))
    assert (needed, how) == (98, "the longest prompt (30 tokens) + sampling.max_new_tokens=68")
    needed, how = rollout.positions_needed(prompts, *settings(placement="prompt", max_new_tokens=68))
    assert needed == 30 + 68 + 68 and "a hint of up to sampling.max_new_tokens=68 tokens" in how
    assert rollout.positions_needed(prompts, *settings(mode="none", placement="prompt"))[0] == 98


def test_guides_beyond_the_completion_budget_are_named():
    assert rollout.guide_budget_warning(*settings(max_length=68, max_new_tokens=68)) is None
    warning = rollout.guide_budget_warning(*settings(max_length=3072, max_new_tokens=1024))
    assert warning.startswith("guidance.max_length=3072 is above sampling.max_new_tokens=1024: guides are capped")
    assert "lower guidance.max_length or raise sampling.max_new_tokens" in warning
    fixed = rollout.guide_budget_warning(*settings(mode="fixed", max_length=10, initial_length=100, max_new_tokens=64))
    assert fixed.startswith("guidance.initial_length=100 is above")
    assert rollout.guide_budget_warning(*settings(mode="none", max_length=3072, max_new_tokens=8)) is None


def test_a_start_whose_rollouts_exceed_the_model_positions_fails_before_loading_and_leaves_nothing(
        tmp_path, checkpoint):
    path = checkpoint
    workdir = tmp_path / "run"
    cfg = demo_config(workdir)
    cfg.model.update({"random_init": False, "checkpoint": path})
    cfg.sampling.max_new_tokens = 50_000
    cfg.guidance.max_length = 68
    with pytest.raises(ValueError, match=(
            r"the longest prompt \(\d+ tokens\) \+ sampling.max_new_tokens=50000 = \d+ positions, more than the "
            r"model's max_position_embeddings=\d+ \(.*config.json\); lower sampling.max_new_tokens or "
            r"data.max_prompt_tokens")):
        train.train(cfg)
    assert not os.path.exists(workdir)  # no empty checkpoints/ folder or run directory left behind


def test_removing_an_empty_run_dir_keeps_anything_with_content(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    resume.remove_empty_run_dir(str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json"]
    resume.remove_empty_run_dir(str(tmp_path / "absent"))  # nothing to do, no error


# ----------------------------------------------------------------------------- damaged inputs


def copy_checkpoint(source: str, target) -> str:
    shutil.copytree(source, target)
    return str(target)


@pytest.mark.parametrize("keep_bytes, cause", [
    (5, r"5 bytes, shorter than the 8-byte header length"),
    (100, r"its header claims \d+ bytes but the file has 100"),
    (-64, r"its tensors need \d+ bytes but the file has \d+"),
])
def test_a_truncated_safetensors_file_is_named_with_the_cause(tmp_path, checkpoint, keep_bytes, cause):
    path = copy_checkpoint(checkpoint, tmp_path / "model")
    weights = sorted(glob.glob(os.path.join(path, "*.safetensors")))[0]
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(keep_bytes if keep_bytes > 0 else size + keep_bytes)
    with pytest.raises(ValueError, match=rf"{re.escape(weights)} is not a complete safetensors file: {cause}; it is "
                                         r"truncated or corrupted"):
        models.load_hf(path)


def test_a_checkpoint_without_tokenizer_files_is_refused(tmp_path, checkpoint):
    path = copy_checkpoint(checkpoint, tmp_path / "model")
    assert len(models.load_tokenizer(path)) == models.read_config(path).vocab_size  # complete: loads
    for name in os.listdir(path):  # only the weights and config.json stay
        if name != "config.json" and not name.endswith(".safetensors"):
            os.remove(os.path.join(path, name))
    with pytest.raises(ValueError, match=rf"'{re.escape(path)}' has no tokenizer files \(none of tokenizer.json"):
        models.load_tokenizer(path)


def test_empty_data_and_a_length_policy_that_drops_everything_are_named(tmp_path, checkpoint):
    tokenizer = models.load_tokenizer(checkpoint)
    cfg = data.get_default_config()
    cfg.source, cfg.adapter = str(tmp_path / "empty.jsonl"), "math"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"data.source='.*empty.jsonl' .* holds no examples: the file is empty"):
        data.prepare_from_config(cfg, tokenizer)
    (tmp_path / "two.jsonl").write_text("".join(
        json.dumps({"problem": f"What is {n} + {n}?", "solution": f"\\boxed{{{2 * n}}}"}) + "\n" for n in (1, 2)))
    cfg.source, cfg.max_prompt_tokens, cfg.template = str(tmp_path / "two.jsonl"), 2, "plain"
    with pytest.raises(ValueError, match=r"all 2 prompts of data.source='.*two.jsonl' are longer than "
                                         r"data.max_prompt_tokens=2 tokens .* set data.overlong='truncate_left'"):
        data.prepare_from_config(cfg, tokenizer)


def test_a_missing_data_file_stops_the_start_with_its_name(tmp_path):
    cfg = demo_config(tmp_path / "run")
    cfg.data.source = str(tmp_path / "absent.jsonl")
    with pytest.raises(train.StartError, match=r"source='.*absent.jsonl': no such file"):
        train.train(cfg)
