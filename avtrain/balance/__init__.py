"""Balancing methods, chosen by name from a registry.

Adding a method is one module with a `Balancer` subclass (its options declared in it) plus one
`register` line here; a plug-in is the same subclass in the user's own file (`--method-module`)
or package (the `avbalance.methods` entry-point group), checked by plugins.py.

Methods: `none` (CE on the fused logits), `ogm`, `ogm_ge` (ogm.py), `olm`, `olm_com` (olm.py),
`pmr` (pmr.py), `opm` (opm.py), `reconboost` (reconboost.py), `agm` (agm.py), `amco` (amco.py),
`greedy` (greedy.py), `mla` (mla.py), `relearning` (relearning.py), `mmpareto` (mmpareto.py),
`valuation` (valuation.py), `cml` (cml.py), `mbsd` (mbsd.py), `lfm` (lfm.py), `gblending`
(gblending.py), `mmcosine` (mmcosine.py), `unimodal_teacher` (unimodal_teacher.py),
`inforeg` (inforeg.py), `cggm` (cggm.py), `remix` (remix.py), `arl` (arl.py), `dgl`
(dgl.py). How a
method plugs in (hooks, or owning the whole step) is in base.py.
Their rules are reusable on their own: `ogm_scores(logits, labels, modalities)`,
`ogm_coefficients(scores, alpha)`, `modulated_parameters(encoder, "conv"|"encoder")` and
`olm_ratios(rule, train_now, train_init, val_now, val_init)`, `pmr_coefficients(scores, alpha)`
and `prototype_logits(features, prototypes)`, `opm_drop_probabilities(scores, q_base, lam)`,
`reconboost_stage(epoch, modalities, stage_epochs, correct_epochs)` and
`boosting_loss(logits, join, labels, weight1, weight2)`,
`agm_contributions(outputs, modalities)` and `agm_coefficients(scores, running, alpha, cap)`,
`amco_masked_count(level, eps, classes)` and `amco_share_sums(unimodal_logits)`,
`greedy_speed_difference(m_sums)` and `greedy_rule(state, d, ...)`,
`owm_update(P, r, alpha)` and `project_gradient(grad, P, mode)` (MLA's head-gradient edit),
`minmax_scale(x)`, `kmeans(x, k, n_init=...)`, `purity(labels, clusters)` and
`relearning_weight(p_train, p_val, lam)`, `min_norm_weight`, `mmpareto_weights` and
`mmpareto_gradient` (MMPareto's combination), `valuation_contributions`, `sample_copies` and
`modality_gap`, `cml_confidence`, `cml_order` and `cml_penalty_terms`, `mbsd_loss` and
`mbsd_pair_terms`, `lfm_alignment`, `lfm_alpha_update` and `lfm_fitted_alpha`,
`gblending_weights` and `gblending_ogr`, `mmcosine_signal`, `distillation_losses` and
`teacher_runs` (the uni-modal teacher's), `inforeg_rate`, `inforeg_betas` and `fisher_trace`
(InfoReg's), `cggm_coefficients` and `cggm_lgm` (CGGM's), `remix_divergence` and
`remix_assign` (Remix's), `arl_analysis_weights` and `arl_unimodal_logits` (ARL's),
`dgl_logits` and `dgl_loss` (DGL's).
"""

from __future__ import annotations

from avprep.errors import UserError
from avtrain.options import Option, Search

from .agm import AGM, agm_coefficients, agm_contributions
from .amco import AMCo, amco_masked_count, amco_share_sums
from .arl import ARL, arl_analysis_weights, arl_unimodal_logits
from .base import Balancer
from .cggm import CGGM, cggm_coefficients, cggm_lgm
from .cml import CML, cml_confidence, cml_order, cml_penalty_terms
from .dgl import DGL, dgl_logits, dgl_loss
from .gblending import GBlending, gblending_ogr, gblending_weights
from .greedy import Greedy, greedy_rule, greedy_speed_difference
from .inforeg import InfoReg, fisher_trace, inforeg_betas, inforeg_rate
from .lfm import LFM, lfm_alignment, lfm_alpha_update, lfm_fitted_alpha
from .mbsd import MBSD, mbsd_loss, mbsd_pair_terms
from .mla import MLA, owm_update, project_gradient
from .mmcosine import MMCosine, mmcosine_signal
from .mmpareto import MMPareto, min_norm_weight, mmpareto_gradient, mmpareto_weights
from .ogm import OGM, OGMGE, modulated_parameters, ogm_coefficients, ogm_scores
from .olm import OLM, OLMCom, olm_ratios
from .opm import OPM, opm_drop_probabilities
from .pmr import PMR, pmr_coefficients, prototype_logits
from .reconboost import ReconBoost, boosting_loss, reconboost_stage
from .relearning import ReLearning, kmeans, minmax_scale, purity, relearning_weight
from .remix import Remix, remix_assign, remix_divergence
from .unimodal_teacher import UnimodalTeacher, distillation_losses, teacher_runs
from .valuation import Valuation, modality_gap, sample_copies, valuation_contributions

METHODS: dict[str, type[Balancer]] = {}
ENTRY_POINTS = "avbalance.methods"  # the entry-point group of installed plug-in packages


def register(cls: type[Balancer], origin: str | None = None) -> type[Balancer]:
    """Add a method to the registry after checking it keeps the interface (plugins.py);
    `origin` names where a plug-in came from, for its error lines."""
    from .plugins import check_method

    check_method(cls, origin, METHODS)
    cls.origin = origin
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Balancer]:
    if name not in METHODS:
        load_plugins()
    try:
        return METHODS[name]
    except KeyError:
        from .plugins import broken_entry_point, broken_entry_points

        broken = broken_entry_point(name)
        if broken:
            raise UserError(f"--method {name}: {broken}") from None
        unloaded = "".join(f"; the plug-in entry point {b} did not load"
                           for b in broken_entry_points())
        raise UserError(f"unknown balancing method {name!r}; choose one of: "
                        f"{', '.join(sorted(METHODS))} (or load a plug-in with "
                        f"--method-module){unloaded}") from None


def build_balancer(name: str, model, config: dict | None = None, **kwargs) -> Balancer:
    return get_method(name)(model, config, **kwargs)


def all_methods() -> dict[str, type[Balancer]]:
    """The registry with the installed plug-ins' methods loaded."""
    load_plugins()
    return METHODS


def load_plugins() -> None:
    from .plugins import load_entry_points

    load_entry_points(ENTRY_POINTS, register)


def load_method_module(spec: str) -> list[str]:
    """A plug-in file or module (--method-module): import it, register its methods."""
    from .plugins import load_module

    return load_module(spec, register, METHODS)


register(Balancer)
register(OGM)
register(OGMGE)
register(OLM)
register(OLMCom)
register(PMR)
register(OPM)
register(ReconBoost)
register(AGM)
register(AMCo)
register(Greedy)
register(MLA)
register(ReLearning)
register(MMPareto)
register(Valuation)
register(CML)
register(MBSD)
register(LFM)
register(GBlending)
register(MMCosine)
register(UnimodalTeacher)
register(InfoReg)
register(CGGM)
register(Remix)
register(ARL)
register(DGL)

__all__ = ["Balancer", "Option", "Search", "METHODS", "register", "get_method", "build_balancer",
           "all_methods", "load_plugins", "load_method_module",
           "ogm_coefficients", "ogm_scores", "modulated_parameters", "olm_ratios",
           "pmr_coefficients", "prototype_logits", "opm_drop_probabilities",
           "reconboost_stage", "boosting_loss", "agm_contributions", "agm_coefficients",
           "amco_masked_count", "amco_share_sums", "greedy_rule", "greedy_speed_difference",
           "owm_update", "project_gradient", "minmax_scale", "kmeans", "purity",
           "relearning_weight"]
__all__ += ["min_norm_weight", "mmpareto_weights", "mmpareto_gradient"]
__all__ += ["valuation_contributions", "sample_copies", "modality_gap"]
__all__ += ["cml_confidence", "cml_order", "cml_penalty_terms"]
__all__ += ["mbsd_loss", "mbsd_pair_terms"]
__all__ += ["lfm_alignment", "lfm_alpha_update", "lfm_fitted_alpha"]
__all__ += ["gblending_weights", "gblending_ogr"]
__all__ += ["mmcosine_signal"]
__all__ += ["distillation_losses", "teacher_runs"]
__all__ += ["inforeg_rate", "inforeg_betas", "fisher_trace"]
__all__ += ["cggm_coefficients", "cggm_lgm"]
__all__ += ["remix_divergence", "remix_assign"]
__all__ += ["arl_analysis_weights", "arl_unimodal_logits"]
__all__ += ["dgl_logits", "dgl_loss"]
