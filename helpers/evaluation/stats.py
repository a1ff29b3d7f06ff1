"""The statistics every comparison in the series reports: a bootstrap CI of a mean, the paired difference of two
variants on the same prompts and seeds (mean, CI, wins, two-sided sign test), and the Wilson interval of a share."""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval

def _as_values(values, what: str = "values") -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D list of numbers, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or infinity")
    return values


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap confidence interval (resampling with replacement,
    numpy Generator seeded with `seed`, so the same data give the same interval)."""
    values = _as_values(values)
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1 (got {level}, {n_boot})")
    rng = np.random.default_rng(seed)
    rows = max(1, 2**22 // values.size)  # resample in chunks of ≤ 4M indices to bound memory
    means = np.concatenate([values[rng.integers(0, values.size, (min(rows, n_boot - done), values.size))].mean(1)
                            for done in range(0, n_boot, rows)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value: how likely a split at least this uneven is if each pair were a fair coin
    toss, 2 · P(Binomial(wins + losses, ½) ≤ min(wins, losses)), capped at 1 (ties are left out before)."""
    if min(wins, losses) < 0:
        raise ValueError(f"wins and losses must be >= 0 (got {wins}, {losses})")
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def paired_difference(tuned, baseline, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of tuned − baseline over aligned pairs (same prompt and seed) with its bootstrap CI, the number of
    pairs, how many the tuned image won and lost, and the sign test's p. A CI excluding 0 means a change beyond
    seed/prompt noise."""
    tuned, baseline = _as_values(tuned, "tuned scores"), _as_values(baseline, "baseline scores")
    if tuned.shape != baseline.shape:
        raise ValueError(f"paired scores must align one to one (got {tuned.size} tuned, {baseline.size} baseline)")
    mean, low, high = bootstrap_ci(tuned - baseline, n_boot, level, seed)
    wins, losses = int((tuned > baseline).sum()), int((tuned < baseline).sum())
    return {"mean_diff": mean, "low": low, "high": high, "n": int(tuned.size), "wins": wins, "losses": losses,
            "p": sign_test(wins, losses)}


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(share, low, high): the Wilson score interval for `successes` of `n` (a tie may count ½)."""
    if n <= 0:
        return math.nan, math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)
