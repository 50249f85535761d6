"""Student's t quantiles for the 95 % intervals of bench tables (no SciPy needed for a table)."""

from __future__ import annotations

# 97.5 % quantiles of Student's t (two-sided 95 % interval) by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """The quantile for `df` degrees of freedom (the nearest tabulated one below: a slightly
    wider interval, never a narrower one); NaN below 1."""
    usable = [d for d in T975 if d <= df]
    return T975[max(usable)] if usable else float("nan")
