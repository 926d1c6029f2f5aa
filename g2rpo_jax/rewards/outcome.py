"""The result of scoring one completion, with the events the train loop must log."""

from __future__ import annotations

import dataclasses

# Names of the counters `score_batch` returns per step.
STAT_KEYS = ("parse_failures", "timeouts", "sandbox_errors", "executions")


@dataclasses.dataclass(frozen=True)
class RewardOutcome:
    """value: the reward. parse_failure: no answer / no program could be extracted or parsed.
    timeouts: executions (or math checks) stopped by a time limit. sandbox_errors: the sandbox,
    not the program, failed. executions: programs run. detail: a short human-readable reason."""

    value: float
    parse_failure: bool = False
    timeouts: int = 0
    sandbox_errors: int = 0
    executions: int = 0
    detail: str = ""

    def counts(self) -> dict[str, int]:
        return {"parse_failures": int(self.parse_failure), "timeouts": self.timeouts,
                "sandbox_errors": self.sandbox_errors, "executions": self.executions}
