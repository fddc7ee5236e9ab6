"""Dataset statistics in LeRobot's names and shapes (meta/stats.json).

Per feature: min, max, mean, std (population, ddof 0), count [number of frames] and the quantiles q01,
q10, q50, q90, q99, each a list with one entry per dimension; image statistics per channel in [0, 1]
(the units the reader yields), shaped (3, 1, 1) as LeRobot stores them. Ours are exact over all
frames (float64, numpy's linearly interpolated quantiles); LeRobot aggregates per-episode statistics,
so its quantiles are approximations (e.g. q01 = -1e-10 for a frame index), which the readers accept.
"""

from __future__ import annotations

import numpy as np

from fmpolicy.errors import DatasetError

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


def compute_stats(data: np.ndarray) -> dict[str, list]:
    """min, max, mean, std (population), count [n] and quantiles q01 .. q99 over axis 0 of (n, d) data."""
    x = np.asarray(data, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DatasetError(f"statistics need (n >= 1, d) data, got shape {x.shape}")
    q = np.quantile(x, list(QUANTILES.values()), axis=0)
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(), "count": [int(x.shape[0])],
            **{name: q[i].tolist() for i, name in enumerate(QUANTILES)}}


def histogram_stats(hist: np.ndarray, frames: int) -> dict[str, list]:
    """LeRobot's image statistics, per channel in [0, 1], shaped (3, 1, 1), from the (3, 256) counts
    of the uint8 pixel values: exact, including numpy's linearly interpolated quantiles."""
    levels = np.arange(256) / 255.0
    n = hist.sum(1, keepdims=True)  # (3, 1) pixels per channel
    mean = (hist * levels).sum(1) / n[:, 0]
    std = np.sqrt(np.maximum((hist * levels**2).sum(1) / n[:, 0] - mean**2, 0.0))
    cum = np.cumsum(hist, 1)  # (3, 256): sorted[k] is the first level whose cum > k

    def sorted_at(k: np.ndarray) -> np.ndarray:  # (3,) the k-th smallest pixel per channel
        return levels[[int(np.searchsorted(cum[c], k[c], side="right")) for c in range(3)]]

    out = {"min": levels[(hist > 0).argmax(1)], "max": levels[255 - (hist[:, ::-1] > 0).argmax(1)],
           "mean": mean, "std": std}
    for name, p in QUANTILES.items():
        pos = p * (n[:, 0] - 1)
        lo = np.floor(pos).astype(np.int64)
        a, b = sorted_at(lo), sorted_at(np.minimum(lo + 1, n[:, 0] - 1).astype(np.int64))
        out[name] = a + (pos - lo) * (b - a)
    result = {k: np.asarray(v, np.float64).reshape(3, 1, 1).tolist() for k, v in out.items()}
    result["count"] = [int(frames)]
    return result
