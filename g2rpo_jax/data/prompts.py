"""Prompt token ids (chat template or plain text), trajectory ids, and the prompt-length policy.

Guidance prefixes are sliced from `encode_trajectory` ids, never re-tokenized from text: token
boundaries of a text prefix drift from those of the full trajectory.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from ml_collections import config_dict

from g2rpo_jax.data.example import Example

logger = logging.getLogger(__name__)

TEMPLATES = ("chat", "plain")
OVERLONG_POLICIES = ("drop", "truncate_left")

DEFAULT_INSTRUCTIONS = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "code_assert": (
        "Write your solution as a complete, self-contained Python function in a single "
        "```python code block."
    ),
    "code_stdio": (
        "Write a complete Python program that reads from standard input and writes to standard "
        "output, in a single ```python code block."
    ),
}


# ----------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """How an example becomes prompt token ids, and what happens to prompts over the length limit.

    template: 'chat' (the tokenizer's chat template) or 'plain' (a text template for base models).
    system: a system message; None (or '') adds none.
    instruction: text appended to the question; None uses the task's default (`DEFAULT_INSTRUCTIONS`:
        \\boxed{} for math, a fenced python block for code), '' adds none.
    enable_thinking: passed to the chat template; None keeps the template's default (on for Qwen3),
        False makes Qwen3's template emit an empty <think></think> block.
    max_prompt_tokens: the prompt-length limit in tokens; None (or 0) means no limit.
    overlong: 'drop' removes prompts over the limit, 'truncate_left' keeps their last tokens.

    The same six keys make up the `data` config section's prompt part and the `eval.prompt`
    section (`as_config` writes them, `from_config` reads them). Construction normalises the
    config's "none" spellings ('' system, 0 limit) to None and raises ValueError on a template,
    policy or limit that is not valid.
    """

    template: str = "chat"
    system: str | None = None
    instruction: str | None = None
    enable_thinking: bool | None = None
    max_prompt_tokens: int | None = None
    overlong: str = "drop"

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r} is unknown; valid templates are {TEMPLATES}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={self.overlong!r} is unknown; valid policies are {OVERLONG_POLICIES}")
        limit = self.max_prompt_tokens
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"max_prompt_tokens={limit!r} must be None, 0 (no limit) or a positive integer")
        object.__setattr__(self, "system", self.system or None)
        object.__setattr__(self, "max_prompt_tokens", limit or None)

    @classmethod
    def from_config(cls, cfg: config_dict.ConfigDict, section: str = "") -> PromptSettings:
        """The settings from a ConfigDict holding the six keys (the `data` section, `eval.prompt`).

        section: the section's name as typed on the command line ('data', 'eval.prompt'), put in
        front of the key in error messages. Raises ValueError for an invalid value.
        """
        values = {field.name: cfg[field.name] for field in dataclasses.fields(cls)}
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{section}.{error}" if section else str(error)) from None

    def as_config(self) -> config_dict.ConfigDict:
        """The six config keys with these values as defaults: None becomes '' (system), 0
        (max_prompt_tokens) or a typed placeholder (instruction: str, enable_thinking: bool), so
        that command-line overrides are parsed with the right type."""
        return config_dict.ConfigDict({
            "template": self.template,
            "system": self.system or "",
            "instruction": config_dict.placeholder(str) if self.instruction is None else self.instruction,
            "enable_thinking": (config_dict.placeholder(bool) if self.enable_thinking is None
                                else self.enable_thinking),
            "max_prompt_tokens": self.max_prompt_tokens or 0,
            "overlong": self.overlong,
        })

    def with_options(self, **options: Any) -> PromptSettings:
        """A copy with some fields replaced (the keyword form of `prepare_prompts`)."""
        return dataclasses.replace(self, **options) if options else self


DEFAULT_PROMPT_SETTINGS = PromptSettings()


def default_instruction(example: Example) -> str:
    return DEFAULT_INSTRUCTIONS[example.task]


def _user_text(example: Example, instruction: str | None) -> str:
    instruction = default_instruction(example) if instruction is None else instruction
    return f"{example.prompt}\n\n{instruction}" if instruction else example.prompt


def chat_messages(example: Example, system: str | None = None, instruction: str | None = None) -> list[dict]:
    """The conversation sent to the chat template. Examples that already carry messages are used
    as they are (no instruction is appended); `system` is prepended unless one is present."""
    if example.messages is not None:
        messages = [dict(m) for m in example.messages]
    else:
        messages = [{"role": "user", "content": _user_text(example, instruction)}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def plain_text(example: Example, system: str | None = None, instruction: str | None = None) -> str:
    """A template for base models: optional system text, the question, the instruction, 'Answer:'."""
    if example.messages is not None:
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in example.messages]
        body = "\n\n".join(turns)
    else:
        body = f"Question:\n{_user_text(example, instruction)}"
    parts = ([system] if system else []) + [body, "Answer:\n"]
    return "\n\n".join(parts)


def prompt_text(example: Example, tokenizer: Any, settings: PromptSettings = DEFAULT_PROMPT_SETTINGS) -> str:
    """The prompt as text, ready for the model to continue with its answer (the settings'
    template, system, instruction and enable_thinking; the length policy is not applied here)."""
    if settings.template == "chat":
        extra = {} if settings.enable_thinking is None else {"enable_thinking": bool(settings.enable_thinking)}
        return tokenizer.apply_chat_template(
            chat_messages(example, settings.system, settings.instruction),
            tokenize=False,
            add_generation_prompt=True,
            **extra,
        )
    return plain_text(example, settings.system, settings.instruction)


def build_prompt(example: Example, tokenizer: Any, settings: PromptSettings = DEFAULT_PROMPT_SETTINGS) -> list[int]:
    """Prompt token ids of one example (see `PromptSettings`; the length policy is not applied)."""
    text = prompt_text(example, tokenizer, settings)
    # The chat template already wrote its special tokens; a plain prompt gets the tokenizer's
    # usual ones (a BOS for models that have one; Qwen3 has none).
    return list(tokenizer.encode(text, add_special_tokens=settings.template == "plain"))


def encode_trajectory(example: Example, tokenizer: Any, fence_code: bool = True) -> list[int]:
    """Trajectory token ids, tokenized once; guidance prefixes are slices of these ids.

    Reference code is wrapped in a ```python fence so that a fully guided rollout looks like the
    answer the code instruction asks for. An empty trajectory gives [].
    """
    text = example.trajectory
    if not text:
        return []
    if fence_code and example.is_code and not text.lstrip().startswith("```"):
        text = f"```python\n{text.rstrip()}\n```"
    return list(tokenizer.encode(text, add_special_tokens=False))


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids that end a completion: the tokenizer's EOS plus Qwen's end-of-turn and end-of-text
    tokens when the vocabulary has them (chat models stop at <|im_end|>, base ones at
    <|endoftext|>)."""
    ids = [tokenizer.eos_token_id]
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is always masked, so it is never read)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id")
    return pad


# ----------------------------------------------------------------------------- length policy

@dataclasses.dataclass(frozen=True)
class LengthReport:
    """What the prompt-length policy did; logged and returned so it is never silent."""

    total: int
    kept: int
    dropped: int
    truncated: int
    longest: int  # longest prompt before the policy, in tokens
    max_prompt_tokens: int | None
    overlong: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_length_policy(
    prompt_ids: Sequence[Sequence[int]],
    max_prompt_tokens: int | None,
    overlong: str = "drop",
) -> tuple[list[int], list[list[int]], LengthReport]:
    """Enforces the prompt length limit.

    Returns (kept_positions, kept_ids, report): kept_positions index into `prompt_ids`.
    'drop' removes prompts longer than the limit; 'truncate_left' keeps their last
    `max_prompt_tokens` tokens (the question's end and the generation prompt survive).
    max_prompt_tokens None or 0 means no limit.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong={overlong!r} is unknown; valid policies are {OVERLONG_POLICIES}")
    if max_prompt_tokens is not None and max_prompt_tokens < 0:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens!r} must be None, 0 (no limit) or positive")
    limit = max_prompt_tokens or None
    kept_positions, kept_ids = [], []
    dropped = truncated = 0
    for position, ids in enumerate(prompt_ids):
        ids = list(ids)
        if limit is not None and len(ids) > limit:
            if overlong == "drop":
                dropped += 1
                continue
            ids = ids[-limit:]
            truncated += 1
        kept_positions.append(position)
        kept_ids.append(ids)
    report = LengthReport(
        total=len(prompt_ids),
        kept=len(kept_ids),
        dropped=dropped,
        truncated=truncated,
        longest=max((len(ids) for ids in prompt_ids), default=0),
        max_prompt_tokens=limit,
        overlong=overlong,
    )
    if dropped or truncated:
        logger.warning(
            "prompt length policy (max_prompt_tokens=%s, overlong=%s): %d of %d prompts were over "
            "the limit (longest %d tokens); dropped %d, left-truncated %d",
            limit, overlong, dropped + truncated, report.total, report.longest, dropped, truncated,
        )
    return kept_positions, kept_ids, report


@dataclasses.dataclass(frozen=True)
class PreparedPrompts:
    """Examples that survived the length policy, aligned with their prompt (and trajectory) ids."""

    examples: tuple[Example, ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    trajectory_ids: tuple[tuple[int, ...], ...] | None
    report: LengthReport

    def __len__(self) -> int:
        return len(self.examples)


def prepare_prompts(
    examples: Sequence[Example],
    tokenizer: Any,
    settings: PromptSettings = DEFAULT_PROMPT_SETTINGS,
    *,
    with_trajectories: bool = True,
    **options: Any,
) -> PreparedPrompts:
    """Tokenizes every prompt once (and every trajectory, if asked), then applies the length
    policy, so that a data iterator can index fixed, pre-tokenized rows.

    options: `PromptSettings` fields that replace those of `settings` (e.g. enable_thinking=False);
    an unknown name raises TypeError.
    """
    settings = settings.with_options(**options)
    texts = [prompt_text(e, tokenizer, settings) for e in examples]
    add_special = settings.template == "plain"
    all_ids = tokenizer(texts, add_special_tokens=add_special)["input_ids"] if texts else []
    positions, kept_ids, report = apply_length_policy(all_ids, settings.max_prompt_tokens, settings.overlong)
    kept_examples = tuple(examples[p] for p in positions)
    trajectories = None
    if with_trajectories:
        trajectories = tuple(tuple(encode_trajectory(e, tokenizer)) for e in kept_examples)
    return PreparedPrompts(
        examples=kept_examples,
        prompt_ids=tuple(tuple(ids) for ids in kept_ids),
        trajectory_ids=trajectories,
        report=report,
    )
