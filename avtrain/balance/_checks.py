"""Option checks shared by the balancing methods: a user mistake becomes one clear line."""

from __future__ import annotations

import math

from avprep.errors import UserError


def require_two_modalities(method: str, modalities: list[str]) -> None:
    """Balancing is between modalities: one modality leaves nothing to balance."""
    if len(modalities) < 2:
        raise UserError(f"--method {method} balances modalities and needs at least two, got "
                        f"{', '.join(modalities) or 'none'}; use --method none for a "
                        "single-modality model")


def number(config: dict, key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return float(default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"--{key.replace('_', '-')} must be a number, got {value!r}") from None


def choice(config: dict, key: str, default: str, choices: tuple[str, ...]) -> str:
    value = config.get(key)
    value = default if value is None else str(value)
    if value not in choices:
        raise UserError(f"--{key.replace('_', '-')} must be one of {', '.join(choices)}, "
                        f"got {value!r}")
    return value


def finite(flag: str, value: float) -> float:
    """`value`, refused in one line when NaN or infinite: a declared range lets NaN through
    (every comparison with it is false)."""
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    return value


def fused_model(model, method: str):
    """The bare model (DDP's `.module`), refused in one line unless it has per-modality encoders
    and a fusion, as the methods that work on the fusion's inputs or outputs need."""
    bare = getattr(model, "module", model)
    if getattr(bare, "encoders", None) is None or getattr(bare, "fusion", None) is None:
        raise UserError(f"--method {method} needs a model with per-modality encoders and a fusion "
                        "(not a sequence model)")
    return bare


def summed_fusion(bare, method: str, why: str) -> None:
    """Refuse fusions whose fused logits are not the sum of per-modality logits of the fused
    layer (concat's weight slices, sum's summands)."""
    if not bare.fusion.decomposable or bare.aux_heads:
        raise UserError(f"--method {method} {why}: use --fusion concat (BalanceMM's) or sum, "
                        f"not {bare.spec['fusion']}")


def window(opt) -> tuple[int, int | None]:
    """A method's resolved modulation window (`opt.modulation_start`, `opt.modulation_end`;
    end None: no end), refused in one line when it ends before it starts -- the one check on
    the window that a single option's declaration cannot make."""
    first, last = opt.modulation_start, opt.modulation_end
    if last is not None and last < first:
        raise UserError(f"--modulation-end ({last}) is before --modulation-start ({first}); "
                        "the window [start, end] is inclusive")
    return first, last
