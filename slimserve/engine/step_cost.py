"""How long a step takes, learned from the engine's own steps: what the scheduler sizes prefill
chunks by under a time-per-output-token target (`--tpot-slo-ms`).

A step's time is modelled as `a + b * rows + c * keys`: a fixed part (the weights streamed once
a step, the Python around it), a part per query row (the matmuls), and a part per key a row
attends to (attention: a prompt chunk deep in a long prompt reads thousands of keys a row). The
three are fitted by exponentially weighted least squares over recent steps, with a small ridge
towards a prior, so that the first steps already give a usable (if rough) answer.
"""

from __future__ import annotations

import numpy as np

# Before any step is seen: 20 ms a step, 0.4 ms a row, 1 ms a thousand keys (the default model
# here, roughly). Coefficients are kept per feature: (1, rows, thousands of keys).
PRIOR = np.array([0.020, 4e-4, 1e-3])


def keys_read(start: int, rows: int) -> int:
    """Keys the `rows` query rows from position `start` on attend to, in all (causal)."""
    return rows * start + rows * (rows + 1) // 2


class StepModel:
    def __init__(self, decay: float = 0.97, ridge: float = 0.1):
        self.decay, self.ridge = decay, ridge
        self.xx = np.zeros((3, 3))
        self.xy = np.zeros(3)
        self.coef = PRIOR.copy()
        self.steps = 0

    @staticmethod
    def _x(rows: int, keys: int) -> np.ndarray:
        return np.array([1.0, float(rows), keys / 1000.0])

    def observe(self, rows: int, keys: int, seconds: float) -> None:
        x = self._x(rows, keys)
        self.xx = self.xx * self.decay + np.outer(x, x)
        self.xy = self.xy * self.decay + x * seconds
        self.steps += 1
        # A ridge towards the prior in each feature's own scale: it settles what the steps
        # seen so far do not (every step the same size, say).
        d = self.ridge * np.diag(np.diag(self.xx) + 1e-9)
        try:
            coef = np.linalg.solve(self.xx + d, self.xy + d @ PRIOR)
        except np.linalg.LinAlgError:
            return
        self.coef = np.maximum(coef, 0.0)

    def predict(self, rows: int, keys: int) -> float:
        return float(self._x(rows, keys) @ self.coef)

    def chunk(self, target_s: float, rows: int, keys: int, start: int, most: int) -> int:
        """The most prompt rows (up to `most`) that a step already holding `rows` rows reading
        `keys` keys can add from position `start` on and still take at most `target_s`."""
        lo, hi = 0, most
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(rows + mid, keys + keys_read(start, mid)) <= target_s:
                lo = mid
            else:
                hi = mid - 1
        return lo
