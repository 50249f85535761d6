"""Balancing methods, chosen by name from a registry.

Adding a method is one module with a `Balancer` subclass plus one `register` line here.

Methods: `none` (CE on the fused logits), `ogm`, `ogm_ge` (ogm.py), `olm`, `olm_com` (olm.py),
`pmr` (pmr.py), `opm` (opm.py), `relearning` (relearning.py). How a method plugs in (hooks,
or owning the whole step) is in base.py.
Their rules are reusable on their own: `ogm_scores(logits, labels, modalities)`,
`ogm_coefficients(scores, alpha)`, `modulated_parameters(encoder, "conv"|"encoder")` and
`olm_ratios(rule, train_now, train_init, val_now, val_init)`, `pmr_coefficients(scores, alpha)`
and `prototype_logits(features, prototypes)`, `opm_drop_probabilities(scores, q_base, lam)`,
`minmax_scale(x)`, `kmeans(x, k)`, `purity(labels, clusters)` and
`relearning_weight(p_train, p_val, lam)`.
"""

from __future__ import annotations

from avprep.errors import UserError

from .base import Balancer
from .ogm import OGM, OGMGE, modulated_parameters, ogm_coefficients, ogm_scores
from .olm import OLM, OLMCom, olm_ratios
from .opm import OPM, opm_drop_probabilities
from .pmr import PMR, pmr_coefficients, prototype_logits
from .relearning import ReLearning, kmeans, minmax_scale, purity, relearning_weight

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
register(OGM)
register(OGMGE)
register(OLM)
register(OLMCom)
register(PMR)
register(OPM)
register(ReLearning)

__all__ = ["Balancer", "METHODS", "register", "get_method", "build_balancer",
           "ogm_coefficients", "ogm_scores", "modulated_parameters", "olm_ratios",
           "pmr_coefficients", "prototype_logits", "opm_drop_probabilities",
           "minmax_scale", "kmeans", "purity", "relearning_weight"]
