"""The assert harness's helpers under their former module name; the harness itself is the
`harness` package (shipped into the sandbox as one script, see harness/__init__.py)."""

from g2rpo_jax.rewards.harness.codec import MAX_DEPTH, Codec, Side
from g2rpo_jax.rewards.harness.judge import Judge, RemoteObject
from g2rpo_jax.rewards.harness.program import ProgramSide
from g2rpo_jax.rewards.harness.wire import Pipe, error_reply, rebuild_error

__all__ = ["MAX_DEPTH", "Codec", "Judge", "Pipe", "ProgramSide", "RemoteObject", "Side",
           "error_reply", "rebuild_error"]
