"""pass@k written straight from its definition with exact integer binomials. Used only by tests.

pass@k = E_problems[ 1 - C(n - c, k) / C(n, k) ]: the chance that a random size-k subset of the
n samples holds at least one of the c correct ones (C(m, k) = 0 when m < k).
"""

from __future__ import annotations

import math
from fractions import Fraction


def pass_at_k_exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def pass_at_k_by_enumeration(n: int, c: int, k: int) -> Fraction:
    """The same probability by listing every k-subset of samples 0..n-1 (the first c correct)."""
    import itertools

    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for subset in subsets if any(i < c for i in subset))
    return Fraction(hits, len(subsets))


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean over problems given (n, c) per problem."""
    return float(sum(pass_at_k_exact(n, c, k) for n, c in counts) / len(counts))
