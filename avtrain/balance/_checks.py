"""Option checks shared by the balancing methods: a user mistake becomes one clear line."""

from __future__ import annotations

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
