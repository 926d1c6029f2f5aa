"""Format reward: is the completion shaped so that its answer can be read?

Well-formed thinking (at most one `<think>` and one `</think>`, in that order; an opening tag
without its closing tag is malformed; `require_think` demands the closing tag, since chat
templates often put the opening one in the prompt) and, after the thinking, a closed final
answer: a complete `\\boxed{...}` for math, a closed fenced python block for code.
"""

from __future__ import annotations

from g2rpo_jax.rewards.code_tests import extract_program
from g2rpo_jax.task_format import THINK_CLOSE, THINK_OPEN, after_thinking, last_boxed

FORMAT_KINDS = ("math", "code")


def _answer_part(completion: str, require_think: bool) -> str | None:
    """The text after the thinking (read as the accuracy rewards read it); None if the thinking
    tags are malformed."""
    closes = completion.count(THINK_CLOSE)
    if completion.count(THINK_OPEN) > 1 or closes > 1 or (require_think and closes == 0):
        return None
    return after_thinking(completion)


def format_reward(completion: str, kind: str = "math", *, require_think: bool = False) -> float:
    """1.0 if the thinking tags are well formed and a final answer of `kind` follows them."""
    if kind not in FORMAT_KINDS:
        raise ValueError(f"kind={kind!r}; valid: {FORMAT_KINDS}")
    answer = _answer_part(completion, require_think)
    if answer is None:
        return 0.0
    if kind == "math":
        boxed = last_boxed(answer)
        return float(boxed is not None and bool(boxed.strip()))
    return float(extract_program(answer) is not None)
