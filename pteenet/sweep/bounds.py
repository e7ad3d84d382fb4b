"""Valid p-values and upper confidence bounds for the two risks a threshold is certified on.

- Accuracy drop (labelled data): per sample the loss is +1 where the backbone is right and the exit's
  answer wrong, -1 where it is the other way round, 0 otherwise; the risk is ``p_plus - p_minus``.
- Disagreement (unlabelled data): the loss is 1 where the answer differs from the backbone's.

Disagreement is a binomial rate: its p-value is the exact binomial tail (Clopper-Pearson's).

The drop needs more care. ``T = n_plus - n_minus`` has, for a given risk, a distribution that also
depends on the discordance rate ``d = p_plus + p_minus`` (a nuisance); the exact tail maximised over
every ``d`` is useless (it is attained at d = 1), and McNemar's conditional test is exact only for a
zero target. We use Berger and Boos's construction: a one-sided upper confidence bound ``d_up`` on
``d`` at level ``gamma`` (``n_plus + n_minus`` is binomial in ``d``), then the exact trinomial tail
``P(T <= t)`` maximised over ``d`` in ``[target, d_up]`` on the null boundary, plus ``gamma``. It is
valid for any ``d``: P(p <= u) <= P(d > d_up) + u - gamma <= u. Spending ``gamma = delta / 50`` on
``d`` widens the bound by about 10% over a test that knew ``d``; the alternatives are much wider at
delta = 0.1 (``benchmarks/cifar10_guarantee.py`` measures them): Bonferroni over two Clopper-Pearson
bounds (``p_plus`` up, ``p_minus`` down) and Waudby-Smith-Ramdas betting, which pays ``log(1/delta)``
for validity at every sample size.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import special

NUISANCE_SHARE = 0.02  # the part of delta spent on the discordance rate's bound
_GRID = 4  # discordance rates tried on [target, d_up] (below the null mean the tail grows with d: d_up is the max)


def binomial_upper(k: int, n: int, alpha: float) -> float:
    """One-sided upper Clopper-Pearson bound of a binomial rate at level 1 - alpha."""
    return 1.0 if k >= n else float(special.betaincinv(k + 1, n - k, 1.0 - alpha))


def disagreement_pvalue(k: int, n: int, target: float) -> float:
    """p-value of H0 "disagreement rate >= target" after ``k`` disagreements in ``n`` samples."""
    if target >= 1.0:
        return 0.0 if k < n else 1.0
    return float(special.bdtr(k, n, target)) if n else 1.0


def _binom_pmf(m: np.ndarray, n: int, p: float) -> np.ndarray:
    return np.exp(special.gammaln(n + 1) - special.gammaln(m + 1) - special.gammaln(n - m + 1)
                  + special.xlogy(m, p) + special.xlog1py(n - m, -p))


def _trinomial_tail(t: int, n: int, d: float, target: float) -> float:
    """P(n_plus - n_minus <= t) for n samples with p_plus - p_minus = target and p_plus + p_minus = d."""
    # Only discordant counts with non-negligible mass are summed; whatever mass lies outside counts
    # as tail (never less than the truth).
    sd = math.sqrt(n * d * (1 - d))
    m = np.arange(max(0, math.floor(n * d - 10 * sd - 10)), min(n, math.ceil(n * d + 10 * sd + 10)) + 1)
    w = _binom_pmf(m, n, d)
    q = min(1.0, (d + target) / (2 * d))  # P(plus | discordant)
    k = np.floor((m + t) / 2)  # n_plus = (m + T) / 2 <= (m + t) / 2
    tail = np.where(k >= m, 1.0, np.where(k >= 0, special.bdtr(np.maximum(k, 0), m, q), 0.0))
    return float(np.sum(w * tail) + max(0.0, 1.0 - np.sum(w)))


def drop_pvalue(n_plus: int, n_minus: int, n: int, target: float, delta: float) -> float:
    """p-value of H0 "accuracy drop p_plus - p_minus >= target" (target a fraction, may be <= 0)."""
    if target >= 1.0:
        return 0.0 if n_plus < n else 1.0
    if n == 0:
        return 1.0
    gamma = NUISANCE_SHARE * delta
    d_up = binomial_upper(n_plus + n_minus, n, gamma)
    d_lo = max(abs(target), 1e-12)  # p_plus - p_minus = target needs d >= |target|
    if d_up < d_lo:
        return gamma
    ds = np.unique(np.linspace(d_lo, d_up, _GRID))
    tail = max(_trinomial_tail(n_plus - n_minus, n, float(d), target) for d in ds)
    return min(1.0, gamma + tail)


def pvalue(counts: tuple[int, int], n: int, target: float, delta: float, labelled: bool) -> float:
    """The p-value of "risk >= target": ``counts`` is (n_plus, n_minus) with labels, else
    (disagreements, 0)."""
    if labelled:
        return drop_pvalue(counts[0], counts[1], n, target, delta)
    return disagreement_pvalue(counts[0], n, target)


def upper_bound(counts: tuple[int, int], n: int, delta: float, labelled: bool) -> float:
    """The smallest target the data certify at level delta: an upper 1 - delta confidence bound
    of the risk (the p-value falls as the target rises, so bisection finds it)."""
    if not labelled:
        return binomial_upper(counts[0], n, delta)
    lo, hi = (counts[0] - counts[1]) / max(n, 1) - 1e-9, 1.0
    if pvalue(counts, n, lo, delta, labelled) <= delta:
        return lo
    for _ in range(26):  # 2^-26: far below any printed digit
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pvalue(counts, n, mid, delta, labelled) <= delta else (mid, hi)
    return hi
