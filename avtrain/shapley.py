"""Each modality's Shapley contribution to the fused accuracy: a direct measure of imbalance.

BalanceMM's evaluation (GeWu-Lab/BalanceBenchmark, commit 4c1482f,
balancemm/evaluation/modalitys.py `Calculate_Shapley`, lines 19-54, with the zeroed inputs of
balancemm/models/avclassify_model.py `forward`, lines 264-270, and `validation_step`, 303-310):
for every subset S of the modalities the model is evaluated with the inputs of the modalities
outside S replaced by zeros (the empty subset included: every input zeroed), v(S) is the fused
accuracy, and

    phi_m = sum over S not holding m of |S|! (M - |S| - 1)! / M! * (v(S + {m}) - v(S)).

The phi_m sum to v(all) - v(none). Exact enumeration: 2^M evaluations, 4 for audio-visual, 8 with
text. The same rule on per-sample correctness (0/1 per sample) gives each sample's contributions
(the valuation method's per-sample Shapley, BalanceMM's `Calculate_Shapley_Sample`): the values
may be numbers or tensors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch


def subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every subset of `modalities`, in their order, smallest first (the empty one first)."""
    return [combo for r in range(len(modalities) + 1)
            for combo in itertools.combinations(modalities, r)]


def subset_name(subset: Sequence[str]) -> str:
    """A subset's name in summaries: "audio+visual"; "none" for the empty subset."""
    return "+".join(subset) or "none"


def zero_absent(batch: dict, present: Sequence[str], modalities: Sequence[str]) -> dict:
    """A shallow copy of `batch` whose inputs of the modalities not in `present` are zeros of
    the same shape (text: all padding), as BalanceMM pads an absent modality."""
    out = dict(batch)
    for m in modalities:
        if m not in present:
            out[m] = torch.zeros_like(batch[m])
    return out


def shapley_values(values: dict[tuple[str, ...], object],
                   modalities: Sequence[str]) -> dict[str, object]:
    """phi_m for each modality from v(S) for every subset S (keys as `subsets` gives them)."""
    n = len(modalities)
    out = {}
    for m in modalities:
        others = [x for x in modalities if x != m]
        phi = 0.0
        for subset in subsets(others):
            with_m = tuple(x for x in modalities if x in subset or x == m)
            weight = math.factorial(len(subset)) * math.factorial(n - len(subset) - 1)
            phi = phi + weight / math.factorial(n) * (values[with_m] - values[subset])
        out[m] = phi
    return out


def shapley_summary(accuracy: dict[tuple[str, ...], float],
                    modalities: Sequence[str]) -> dict:
    """What summary.json and `avtrain eval` report: {modality: phi_m, ..., "subsets":
    {"audio": v, "none": v, ...}} from the fused accuracy of every subset."""
    phi = shapley_values(accuracy, modalities)
    return {**{m: round(float(v), 6) for m, v in phi.items()},
            "subsets": {subset_name(s): round(float(accuracy[s]), 6)
                        for s in subsets(modalities)}}
