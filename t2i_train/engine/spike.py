"""Loss-spike guard: skip updates whose loss or gradient is non-finite or far outside running statistics.

`check_loss(loss)` before backward and `check_grad(norm)` after it return a reason string (skip) or None.
Accepted steps feed the running window; `consecutive` counts skips in a row, and `should_roll_back()` says when
the trainer must restore the last known-good checkpoint (and move to a different data order).

Roll-backs that do not get the run past the step where the previous streak ended are counted in a row; when
`max_rollbacks` of them did not help, `check_rollback_allowed` raises `SpikeGuardError` (the run must stop: more
roll-backs would repeat the same divergence forever).
"""
from __future__ import annotations

import math
from collections import deque


class SpikeGuardError(RuntimeError):
    """The guard gave up: roll-backs did not get the run past the failing step."""


class SpikeGuard:
    def __init__(self, cfg):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.consecutive = 0
        self.total_skipped = 0
        self.rollbacks = 0
        self.rollbacks_in_a_row = 0
        self.failed_at = -1  # the step at which the last roll-back was triggered

    def check_loss(self, loss: float) -> str | None:
        if not self.cfg.enabled:
            return None
        if not math.isfinite(loss):
            return "nonfinite_loss"
        if len(self.history) >= max(self.cfg.min_history, 2):
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(max(sum((x - mean) ** 2 for x in self.history) / (n - 1), 0.0))
            if loss > mean + self.cfg.sigma * std and loss > self.cfg.ratio * mean:
                return "loss_spike"
        return None

    def check_grad(self, grad_norm: float) -> str | None:
        if self.cfg.enabled and not math.isfinite(grad_norm):
            return "nonfinite_grad"
        return None

    def accept(self, loss: float, step: int | None = None) -> None:
        self.history.append(float(loss))
        self.consecutive = 0
        if step is not None and step >= self.failed_at:
            self.rollbacks_in_a_row = 0  # got past the step that failed before: that roll-back worked

    def skip(self) -> None:
        self.consecutive += 1
        self.total_skipped += 1

    def should_roll_back(self) -> bool:
        return self.cfg.enabled and self.consecutive >= self.cfg.max_consecutive

    def check_rollback_allowed(self, step: int, target: str) -> None:
        if self.rollbacks_in_a_row >= self.cfg.max_rollbacks:
            why = (f"{self.rollbacks_in_a_row} roll-back(s) in a row to {target} did not get past step "
                   f"{self.failed_at}" if self.rollbacks_in_a_row else "no roll-back is allowed")
            raise SpikeGuardError(
                f"spike guard: {self.consecutive} consecutive skipped updates at step {step}, and {why} "
                f"(spike_guard.max_rollbacks={self.cfg.max_rollbacks}); stopping. The last known "
                f"good checkpoint is kept: {target}. Lower optim.lr (or its step_downs) or inspect the samples "
                "named in events.jsonl's skipped_update events, then resume")

    def note_rollback(self, failed_at: int) -> None:
        self.rollbacks += 1
        self.rollbacks_in_a_row += 1
        self.failed_at = failed_at
        self.consecutive = 0

    def state_dict(self) -> dict:
        return dict(history=list(self.history), consecutive=self.consecutive, total_skipped=self.total_skipped,
                    rollbacks=self.rollbacks, rollbacks_in_a_row=self.rollbacks_in_a_row, failed_at=self.failed_at)

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state.get("history", []), maxlen=self.cfg.window)
        self.consecutive = int(state.get("consecutive", 0))
        self.total_skipped = int(state.get("total_skipped", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.rollbacks_in_a_row = int(state.get("rollbacks_in_a_row", 0))
        self.failed_at = int(state.get("failed_at", -1))
