"""Loss-spike guard: skip updates whose loss or gradient is non-finite or far outside running statistics.

`check_loss(loss)` before backward and `check_grad(norm)` after it return a reason string (skip) or None.
Accepted steps feed the running window; `consecutive` counts skips in a row, and `should_roll_back()` says when
the trainer must restore the last checkpoint (and move to a different data order).
"""
from __future__ import annotations

import math
from collections import deque


class SpikeGuard:
    def __init__(self, cfg):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.consecutive = 0
        self.total_skipped = 0
        self.rollbacks = 0

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

    def accept(self, loss: float) -> None:
        self.history.append(float(loss))
        self.consecutive = 0

    def skip(self) -> None:
        self.consecutive += 1
        self.total_skipped += 1

    def should_roll_back(self) -> bool:
        return self.cfg.enabled and self.consecutive >= self.cfg.max_consecutive

    def state_dict(self) -> dict:
        return dict(history=list(self.history), consecutive=self.consecutive, total_skipped=self.total_skipped,
                    rollbacks=self.rollbacks)

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state.get("history", []), maxlen=self.cfg.window)
        self.consecutive = int(state.get("consecutive", 0))
        self.total_skipped = int(state.get("total_skipped", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
