"""Balancing methods, chosen by name from a registry.

Adding a method is one module with a `Balancer` subclass plus one `register` line here.
"""

from __future__ import annotations

from avprep.errors import UserError

from .base import Balancer

METHODS: dict[str, type[Balancer]] = {}


def register(cls: type[Balancer]) -> type[Balancer]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Balancer]:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown balancing method {name!r}; choose one of: "
                        f"{', '.join(sorted(METHODS))}") from None


def build_balancer(name: str, model, config: dict | None = None, **kwargs) -> Balancer:
    return get_method(name)(model, config, **kwargs)


register(Balancer)

__all__ = ["Balancer", "METHODS", "register", "get_method", "build_balancer"]
