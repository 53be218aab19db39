"""Percentile bootstrap over questions: every audit score and curve point gets a confidence interval.

A statistic is a function of the question indices it is computed on (so ratios of means, such as a recovery, are
recomputed on every resample, not averaged per question), vectorised over index sets: given indices with the
questions on the last axis (``[k]`` or ``[boot, k]``), it returns one value per set (a scalar, or ``[boot]``), so
all resamples are computed in one array operation. All statistics of one audit resample the same seeded
index sets, so their intervals are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jaxtyping import Float, Int

from patchlab.probes.base import Interval
from patchlab.errors import PatchlabValueError

Statistic = Callable[[Int[np.ndarray, "*sets k"]], Float[np.ndarray, "*sets"]]


def resamples(n: int, n_boot: int, seed: int) -> Int[np.ndarray, "boot n"]:
    """``n_boot`` resamples (with replacement) of the indices ``0..n-1``, from ``seed``."""
    if n < 1:
        raise PatchlabValueError(f"a bootstrap needs at least one question, got {n}")
    if not isinstance(n_boot, int) or n_boot < 1:
        raise PatchlabValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap(statistic: Statistic, n: int, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """``statistic`` on all ``n`` questions, with the central ``level`` percentile interval of its values on
    ``n_boot`` resamples of the questions (resamples where it is NaN, e.g. a ratio with a zero denominator, are
    left out; the interval is NaN when all are).

    Raises:
        PatchlabValueError: ``n < 1``, ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    if not 0 < level < 1:
        raise PatchlabValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(statistic(resamples(n, n_boot, seed)), dtype=float)
    point = float(statistic(np.arange(n)))
    if np.isnan(values).all():
        return Interval(point, float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return Interval(point, float(low), float(high))


def mean_interval(values: Float[np.ndarray, "n"], settings: Mapping[str, Any]) -> Interval:
    """The mean of per-question ``values`` with its bootstrap interval (``settings``: ``n_boot``, ``level``,
    ``seed``)."""
    values = np.asarray(values, dtype=float)
    return bootstrap(lambda idx: values[idx].mean(axis=-1), len(values), **boot_args(settings))


def column_intervals(values: Float[np.ndarray, "n column"], settings: Mapping[str, Any]) -> list[list[float | None]]:
    """:func:`mean_interval` of each column (a layer, a window) of per-question ``values``, as
    ``[mean, low, high]`` lists."""
    return [mean_interval(values[:, k], settings).to_list() for k in range(values.shape[1])]


def ratio_of_gains(after: Float[np.ndarray, "n"], before: Float[np.ndarray, "n"], full: Float[np.ndarray, "n"],
                   settings: Mapping[str, Any], *, eps: float = 1e-9) -> Interval:
    """``(mean(after) - mean(before)) / (mean(full) - mean(before))`` over questions, with its bootstrap interval:
    the share of the gap between ``before`` and ``full`` that ``after`` closes (NaN where the gap is below
    ``eps``)."""
    after, before, full = (np.asarray(x, dtype=float) for x in (after, before, full))
    if not after.shape == before.shape == full.shape:
        raise PatchlabValueError(f"per-question arrays differ in shape: {after.shape}, {before.shape}, {full.shape}")

    def ratio(idx: np.ndarray) -> np.ndarray:
        gap = full[idx].mean(axis=-1) - before[idx].mean(axis=-1)
        gain = after[idx].mean(axis=-1) - before[idx].mean(axis=-1)
        return np.divide(gain, gap, out=np.full_like(gap, np.nan), where=np.abs(gap) > eps)

    return bootstrap(ratio, len(after), **boot_args(settings))


def boot_args(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The bootstrap keyword arguments (``n_boot``, ``level``, ``seed``) of resolved audit settings."""
    return {k: settings[k] for k in ("n_boot", "level", "seed")}
