"""Small pure fits behind the charts: the test-time loop saturation law and overthinking.

Parcae (arXiv 2604.12946, section 5.3) fits held-out loss against test-time loops T with
L(T) = L_inf + Z * exp(-z * T); L_inf is close to the loss at T = the training mean loops.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

# Starting decay rates tried by the fit; the best (least squares) wins. Loop counts are small integers,
# so rates between a tenth and a few per loop cover every curve that saturates within the sweep.
_Z_RATE_STARTS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
_MAX_RATE = 50.0


class Saturation(NamedTuple):
    L_inf: float     # the loss the curve approaches as T grows
    Z: float         # gap at T = 0 (positive: loss falls with more loops)
    z: float         # decay rate per loop
    residual: float  # root-mean-square of (data - fit)

    def predict(self, T: np.ndarray | float) -> np.ndarray:
        return self.L_inf + self.Z * np.exp(-self.z * np.asarray(T, dtype=float))

    def loops_to_within(self, fraction: float) -> float:
        """Smallest T at which the fitted gap Z exp(-zT) is below `fraction` of L_inf (may be < 1)."""
        if self.Z <= 0 or self.L_inf <= 0:
            return 0.0
        return max(math.log(self.Z / (fraction * self.L_inf)) / self.z, 0.0)


def saturation_curve(T: np.ndarray, L_inf: float, Z: float, z: float) -> np.ndarray:
    return L_inf + Z * np.exp(-z * T)


def fit_saturation(T, L) -> Saturation:
    """Least-squares fit of L(T) = L_inf + Z exp(-z T) (z > 0). Needs at least 3 distinct T.

    Raises ValueError when the points cannot determine the three parameters or no fit converges.
    """
    T = np.asarray(T, dtype=float)
    L = np.asarray(L, dtype=float)
    if T.shape != L.shape or T.ndim != 1:
        raise ValueError(f"fit_saturation: T and L must be 1-D and the same length, got {T.shape} and {L.shape}")
    keep = np.isfinite(T) & np.isfinite(L)
    T, L = T[keep], L[keep]
    if np.unique(T).size < 3:
        raise ValueError(f"fit_saturation: needs at least 3 distinct finite loop counts, got {np.unique(T).tolist()}")
    best: tuple[float, np.ndarray] | None = None
    for z0 in _Z_RATE_STARTS:
        # Start from the curve through the last point with the first point's gap.
        L0 = float(L[np.argmax(T)])
        Z0 = (float(L[np.argmin(T)]) - L0) * math.exp(z0 * float(T.min()))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(saturation_curve, T, L, p0=(L0, Z0, z0), maxfev=5000,
                                      bounds=([-np.inf, -np.inf, 1e-6], [np.inf, np.inf, _MAX_RATE]))
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((saturation_curve(T, *params) - L) ** 2))
        if math.isfinite(sse) and (best is None or sse < best[0]):
            best = (sse, params)
    if best is None:
        raise ValueError(f"fit_saturation: no fit converged for T={T.tolist()}, L={L.tolist()}")
    sse, (L_inf, Z, z) = best
    if z * float(T.max() - T.min()) < 0.05:
        # The exponential has degenerated into a straight line over the measured range: L_inf and Z are
        # then arbitrary (large and cancelling), so there is no saturation to report.
        raise ValueError(f"fit_saturation: the loss does not level off over T={T.min():g}..{T.max():g} "
                         f"(fitted rate z={z:.2g} per loop, a straight line)")
    return Saturation(float(L_inf), float(Z), float(z), math.sqrt(sse / T.size))


class Overthinking(NamedTuple):
    best_T: float     # loop count with the lowest loss
    best_L: float
    worst_T: float    # a later loop count, beyond training, where the loss is highest
    worst_L: float


def overthinking(T, L, loops_train: float, tolerance: float = 0.0) -> Overthinking | None:
    """The loss rising again beyond the training loop count, or None.

    Flagged when some T > max(loops_train, T_best) has a loss above the lowest loss by more than
    `tolerance` (use the evaluation noise, e.g. the seed standard deviation).
    """
    T = np.asarray(T, dtype=float)
    L = np.asarray(L, dtype=float)
    keep = np.isfinite(T) & np.isfinite(L)
    T, L = T[keep], L[keep]
    if T.size < 2:
        return None
    i_best = int(np.argmin(L))
    later = (T > max(float(loops_train), float(T[i_best])))
    if not later.any():
        return None
    j = int(np.flatnonzero(later)[np.argmax(L[later])])
    if L[j] - L[i_best] <= tolerance:
        return None
    return Overthinking(float(T[i_best]), float(L[i_best]), float(T[j]), float(L[j]))
