"""What every balancing method must satisfy, checked for every registered method and the example
plug-in (issue #28, item 4), so a method's own test file keeps only what is its own (the
differential test against its released code, its rule by hand):

- its declared defaults are the released values, transcribed here from the released code (a
  default that differs must say so and is pinned below), and the balancer runs with them;
- its options round-trip through config.yaml, and bad values are refused before training;
- a plug-in that breaks the interface is one `Error:` line naming it;
- it declares what `avtrain bench --tune` searches (or is in NOTHING_TO_TUNE with why), each
  range a number range that holds the released value;
- (slow) 2 gloo processes equal 1 process with the global batch; `--resume` after an epoch
  gives the uninterrupted run's weights and balancer state; a one-epoch CLI run logs every key
  of `signals` and `avtrain report` draws them.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from released import (
    as_batch,
    assert_fit_refused,
    make_batches,
    method_fit_args,
    run_gloo,
    step_trainer,
)

from avtrain.balance import METHODS, all_methods, load_method_module
from avtrain.balance import plugins as plugin_loader
from avtrain.balance.base import EpochContext

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "unimodal_aux.py")
PLUGIN = "unimodal_aux"
# built-in methods only: a plug-in another test loaded into this process is not avbalance's
BUILT_IN = sorted(m for m, cls in all_methods().items() if cls.origin is None)
EVERY = BUILT_IN + [PLUGIN]
CLASSES, GLOBAL = 3, 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def registry():
    """The registry with the example plug-in loaded, restored afterwards so no other test sees
    a method it did not ask for."""
    methods, loaded = dict(METHODS), dict(plugin_loader._loaded_modules)
    load_method_module(EXAMPLE)
    yield METHODS
    METHODS.clear()
    METHODS.update(methods)
    plugin_loader._loaded_modules.clear()
    plugin_loader._loaded_modules.update(loaded)


def module_args(method: str) -> list[str]:
    return ["--method-module", EXAMPLE] if method == PLUGIN else []


def invoke(*args: str):
    from cli import avtrain

    return CliRunner().invoke(avtrain, [str(a) for a in args])


# --- (f) defaults are the released values ------------------------------------------------------

# Every option of every built-in method: (method, option) -> (the authors' released value, where
# it is). Transcribed from the released code (fetched repositories, HEAD at the commits the
# modules cite), not from our modules. Our epochs count from 0: a released 1-based epoch E is
# E - 1 here. None: the released value is computed (or given) at run time, as the note says.
BMM = "GeWu-Lab/BalanceBenchmark configs/trainer_config.yaml"
RELEASED = {
    ("ogm", "alpha"): (None, "GeWu-Lab/OGM-GE_CVPR2022 main.py:43 (required=True, no default)"),
    ("ogm", "modulation_start"): (0, "GeWu-Lab/OGM-GE_CVPR2022 main.py:41"),
    ("ogm", "modulation_end"): (50, "GeWu-Lab/OGM-GE_CVPR2022 main.py:42"),
    ("ogm", "modulate"): ("conv", "GeWu-Lab/OGM-GE_CVPR2022 main.py (len(parms.grad.size()) == 4)"),
    ("olm", "initial"): ("last-batch", "anonymous-gitlab/OLM engines/engine_logits.py:59 "
                                       "(`iteration == 0` is the epoch: every batch of epoch 0)"),
    ("olm", "lr"): (None, "anonymous-gitlab/OLM main_logits.py:105 (Adam lr 0.001 for the CNNs; "
                          "the network's lr for the transformers)"),
    ("olm", "weight_decay"): (None, "anonymous-gitlab/OLM main_logits.py:105 (none for the CNNs)"),
    ("olm", "reduction"): ("sum", "anonymous-gitlab/OLM losses/loss.py:18"),
    ("olm_com", "heldout"): ("train", "anonymous-gitlab/OLM engines/engine_logits_com.py:37"),
    ("pmr", "alpha"): (1.0, "fanyunfeng-bit/Modal-Imbalance-PMR main_Prototype_grad.py:49"),
    ("pmr", "modulation_start"): (0, "fanyunfeng-bit/Modal-Imbalance-PMR main_Prototype_grad.py:47"),
    ("pmr", "modulation_end"): (100, "fanyunfeng-bit/Modal-Imbalance-PMR main_Prototype_grad.py:48"),
    ("pmr", "momentum"): (0.2, "fanyunfeng-bit/Modal-Imbalance-PMR main_Prototype_grad.py:39"),
    ("pmr", "proto_batches"): (None, "fanyunfeng-bit/Modal-Imbalance-PMR main_Prototype_grad.py "
                                     "calculate_prototype (len(train_loader) // 10)"),
    ("opm", "alpha"): (0.5, "GeWu-Lab/BML_TPAMI2024 code/main.py:43 (--lam)"),
    ("opm", "modulation_start"): (6, "GeWu-Lab/BML_TPAMI2024 code/main.py:91 "
                                     "(warm_up=1 if epoch<=5)"),
    ("opm", "modulation_end"): (None, "GeWu-Lab/BML_TPAMI2024 code/main.py:91 (no end)"),
    ("opm", "q_base"): (0.5, "GeWu-Lab/BML_TPAMI2024 code/main.py:42"),
    ("opm", "p_exe"): (0.7, "GeWu-Lab/BML_TPAMI2024 code/main.py:44"),
    ("opm", "theta_grad"): ("released", "GeWu-Lab/BML_TPAMI2024 code/models/Classifier.py:17-21"),
    ("reconboost", "alpha"): (0.5, "huacong/ReconBoost train.py:77"),
    ("reconboost", "stage_epochs"): (4, "huacong/ReconBoost train.py:59 (--epochs_per_stage)"),
    ("reconboost", "correct_epochs"): (None, "huacong/ReconBoost train.py:60 (--correct_epoch 4 "
                                             "= --epochs_per_stage)"),
    ("reconboost", "weight1"): (5.0, "huacong/ReconBoost train.py:75"),
    ("reconboost", "weight2"): (1.0, "huacong/ReconBoost train.py:76"),
    ("reconboost", "reset_optimizer"): (True, "huacong/ReconBoost train.py (a new SGD per phase)"),
    ("agm", "alpha"): (1.0, "lihong2303/AGM utils/config.py:76"),
    ("agm", "modulation_start"): (0, "lihong2303/AGM utils/config.py:74"),
    ("agm", "modulation_end"): (19, "lihong2303/AGM utils/config.py:75 (20, 1-based epochs)"),
    ("agm", "cap"): (10.0, "lihong2303/AGM run/CREMAD_main.py:151"),
    ("agm", "clip"): (1.0, "lihong2303/AGM run/CREMAD_main.py:238"),
    ("agm", "after_window"): ("hold", "lihong2303/AGM run/CREMAD_main.py (scale kept after the "
                                      "window)"),
    ("agm", "floor"): (1e-8, "lihong2303/AGM run/CREMAD_main.py:133"),
    ("amco", "modulation_start"): (0, BMM + ":23"),
    ("amco", "modulation_end"): (80, BMM + ":24"),
    ("amco", "sigma"): (0.5, BMM + ":25"),
    ("amco", "eps"): (0.3, BMM + ":27"),
    ("greedy", "modulation_start"): (1, "nyukat/greedy_multimodal_learning configs/training.gin:16"
                                        " (starting_epoch=2, 1-based)"),
    ("greedy", "modulation_end"): (None, "nyukat/greedy_multimodal_learning (no end)"),
    ("greedy", "epsilon"): (0.01, "nyukat/greedy_multimodal_learning configs/training.gin:14"),
    ("greedy", "window"): (5, "nyukat/greedy_multimodal_learning configs/training.gin:15"),
    ("greedy", "loss"): ("unimodal", "nyukat/greedy_multimodal_learning src (sum of the "
                                     "per-modality CEs)"),
    ("greedy", "average"): ("released", "nyukat/greedy_multimodal_learning src/mmtm.py (the "
                                        "second modality's gates by the first's means)"),
    ("mla", "projection"): ("none", "Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-"
                                    "Adaptation utils/utils.py:32 (only 'module.weight')"),
    ("mla", "gate"): ("batch-entropy", "Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-"
                                       "Adaptation main.py:640 (--dynamic)"),
    ("mla", "stale_grads"): ("zero", "Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-"
                                     "Adaptation main.py:440-464 (zero_grad of torch 1.8.1)"),
    ("relearning", "lam"): (3.0, "GeWu-Lab/Diagnosing_Relearning_ECCV2024 code/ours.py:53"),
    ("relearning", "every"): (20, "GeWu-Lab/Diagnosing_Relearning_ECCV2024 code/ours.py:55"),
    ("relearning", "times"): (3, "GeWu-Lab/Diagnosing_Relearning_ECCV2024 code/ours.py:56"),
    ("relearning", "kmeans"): ("sklearn", "GeWu-Lab/Diagnosing_Relearning_ECCV2024 "
                                          "code/ours.py:110"),
    ("relearning", "n_init"): (10, "GeWu-Lab/Diagnosing_Relearning_ECCV2024 code/ours.py:110 "
                                   "(sklearn's default before 1.4)"),
    ("mmpareto", "gamma"): (1.5, "GeWu-Lab/MMPareto_ICML2024 code/MMPareto.py:178"),
    ("valuation", "level"): ("sample", "GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation "
                                       "code/sample_level.py (the paper's sample level)"),
    ("valuation", "warmup"): (5, "GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation "
                                 "code/sample_level.py:44"),
    ("valuation", "part_ratio"): (0.2, "GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation "
                                       "code/modality_level.py:51"),
    ("valuation", "gap_alpha"): (1.0, "GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation "
                                      "code/modality_level.py:52"),
    ("cml", "modulation_start"): (0, BMM + ":30"),
    ("cml", "modulation_end"): (80, BMM + ":31"),
    ("cml", "lam"): (0.1, BMM + ":32"),
    ("cml", "form"): ("balancemm", "GeWu-Lab/BalanceBenchmark balancemm/trainer/CML_trainer.py"),
    ("mbsd", "modulation_start"): (0, BMM + ":48"),
    ("mbsd", "modulation_end"): (80, BMM + ":49"),
    ("mbsd", "rs_on"): ("auto", "GeWu-Lab/BalanceBenchmark balancemm/trainer/MBSD_trainer.py"),
    ("lfm", "schedule"): ("learnable", "njustkmg/NeurIPS24-LFM Crema_epoch_learnable.py:254"),
    ("lfm", "alpha_init"): (0.95, "njustkmg/NeurIPS24-LFM Crema_epoch_learnable.py:250"),
    ("lfm", "lr_alpha"): (1e-4, "njustkmg/NeurIPS24-LFM Crema_epoch_learnable.py:246"),
    ("lfm", "lr_alpha_halving"): (20, "njustkmg/NeurIPS24-LFM Crema_epoch_learnable.py:90"),
    ("lfm", "cls_input"): ("mean", "njustkmg/NeurIPS24-LFM Crema_epoch_learnable.py:71"),
    ("lfm", "alpha_mode"): ("released", "njustkmg/NeurIPS24-LFM Crema_epoch_learnable.py:55-97"),
    ("lfm", "heldout_size"): (8, "njustkmg/NeurIPS24-LFM Crema_epoch_learnable.py:59,227 "
                                 "(half of a val batch of 16)"),
    ("gblending", "super_epoch"): (10, BMM + ":38"),
    ("gblending", "offline"): (False, BMM + ":35 (method online)"),
    ("gblending", "weights"): (None, "GeWu-Lab/BalanceBenchmark balancemm/trainer/"
                                     "GBlending_trainer.py (estimated)"),
    ("mmcosine", "scaling"): (10.0, "GeWu-Lab/MMCosine_ICASSP23 main_CD.py:59"),
    ("mmcosine", "eval_fused"): ("concat", "GeWu-Lab/MMCosine_ICASSP23 main_CD.py:155 (valid: "
                                           "the plain concat output)"),
    ("unimodal_teacher", "modulation_start"): (0, BMM + ":64"),
    ("unimodal_teacher", "modulation_end"): (80, BMM + ":65"),
    ("unimodal_teacher", "runs"): ([], "GeWu-Lab/BalanceBenchmark balancemm/trainer/"
                                       "UMT_trainer.py (teachers given by the user)"),
    ("unimodal_teacher", "scaling"): (10.0, BMM + ":66"),
    ("unimodal_teacher", "mode"): ("train", "GeWu-Lab/BalanceBenchmark balancemm/trainer/"
                                            "UMT_trainer.py (teachers never put in eval mode)"),
    ("inforeg", "beta_audio"): (0.95, "GeWu-Lab/InfoReg_CVPR2025 main.py:468"),
    ("inforeg", "beta_other"): (0.1, "GeWu-Lab/InfoReg_CVPR2025 main.py:476"),
    ("inforeg", "threshold"): (0.05, "GeWu-Lab/InfoReg_CVPR2025 main.py:465,473 (k > 0.05)"),
    ("inforeg", "window"): (10, "GeWu-Lab/InfoReg_CVPR2025 main.py:240-241 ([-10:], [-11:-1]),"
                                " 694 (ten leading zeros)"),
    ("inforeg", "trace_modality"): ("audio", "GeWu-Lab/InfoReg_CVPR2025 main.py:243,595 "
                                             "(audio_trace_list)"),
    ("cggm", "rho"): (1.3, "zrguo/CGGM run/iemo_run.py:55 (--rou)"),
    ("cggm", "lam"): (0.2, "zrguo/CGGM run/iemo_run.py:56 (--lamda; run/food_run.py: 0.05)"),
    ("cggm", "lr"): (5e-4, "zrguo/CGGM run/iemo_run.py:49 (--cls_lr)"),
    ("cggm", "clip"): (0.8, "zrguo/CGGM run/iemo_run.py:45 (--clip)"),
    ("cggm", "classifier"): ("released", "zrguo/CGGM models/msamodel.py:77-94 (Classifier)"),
    ("remix", "warmup"): (10, "MatthewMaxy/Remix_ICML2025 train.py:36, scripts/run_train.sh"),
    ("remix", "warm_audio"): (0.5, "MatthewMaxy/Remix_ICML2025 train.py:43 (--alpha)"),
    ("remix", "warm_visual"): (0.5, "MatthewMaxy/Remix_ICML2025 train.py:44 (--beta)"),
    ("remix", "gamma_visual"): (1.0, "MatthewMaxy/Remix_ICML2025 train.py:45 (--gamma1)"),
    ("remix", "gamma_audio"): (1.0, "MatthewMaxy/Remix_ICML2025 train.py:46 (--gamma2)"),
    ("arl", "gamma"): (4.0, "shicaiwei123/ICCV2025-ARL cramed_arl.sh:3 (--gamma 4.0; AVE 5.0, "
                            "KS 3.0, argparse default 1.0 at main_arl_variance.py:65)"),
    ("arl", "modulation_start"): (6, "shicaiwei123/ICCV2025-ARL main_arl_variance.py:69,150 "
                                     "(--start 5, `epoch > args.start`)"),
    ("arl", "weights"): ("released", "shicaiwei123/ICCV2025-ARL main_arl_variance.py:163-164 "
                                     "(audio_weight = visual_weight = 0.5, never changed)"),
    ("arl", "temperature"): (8.0, "shicaiwei123/ICCV2025-ARL main_arl_variance.py:68 and "
                                  "cramed_arl.sh:3 (--T 8.0)"),
    ("dgl", "alpha"): (4.0, "shicaiwei123/ICCV2025-GDL main_dgl.py:50 and cramed_dgl.sh:8 "
                            "(--alpha 4; its next run 5, ks_dgl.sh 2 and 3)"),
}
# methods that share another's options (and their released values)
SAME_AS = {"ogm_ge": "ogm", "olm_com": "olm"}

# The defaults that deliberately differ from the released value (each with its `differs`):
# a new difference has to be added here on purpose.
DIFFERS = {("olm", "initial"), ("olm_com", "initial"), ("greedy", "average"), ("mla", "gate"),
           ("relearning", "kmeans")}


def released(method: str, option: str):
    key = (method, option)
    if key not in RELEASED and method in SAME_AS:
        key = (SAME_AS[method], option)
    return RELEASED[key]


# --- (h) tuning ranges: what `avtrain bench --tune` searches -----------------------------------

# The built-in methods that declare no search range, each with why: a new method decides (a
# range on its options, or a line here).
NOTHING_TO_TUNE = {
    "none": "the baseline: it has no options",
    "mla": "the released step has no weight or rate of its own; its options are variants of the "
           "algorithm (the head projection, the test-time gate, what zero_grad leaves)",
}
# Where RELEASED has None (computed at run time), the values the released code runs with; each
# must lie in the searched range as a released value does.
RUN_TIME_RELEASED = {
    ("ogm", "alpha"): (0.8, 0.1),  # the released README's CREMA-D and VGGSound presets
    ("olm", "lr"): (1e-3,),  # main_logits.py:105, the CNN encoders
}
# Searched ranges that leave the released value out, each with why: none so far.
OUTSIDE_RELEASED: dict = {}
SEARCHED = [(m, o.name) for m in BUILT_IN for o in all_methods()[m].options if o.search]


def searched_range_holds(search, value) -> bool:
    if search.choices:
        return value in search.choices
    return search.low <= value <= search.high


def test_every_option_has_its_released_value_in_the_table():
    declared = {(m, o.name) for m in BUILT_IN for o in all_methods()[m].options}
    missing = sorted(k for k in declared if k[0] not in SAME_AS and k not in RELEASED
                     and not (k[0] in SAME_AS and (SAME_AS[k[0]], k[1]) in RELEASED))
    assert not missing, f"options without a released value in RELEASED: {missing}"
    stale = sorted(k for k in RELEASED if k not in declared)
    assert not stale, f"RELEASED names options no method declares: {stale}"


@pytest.mark.parametrize("method", BUILT_IN)
def test_declared_defaults_are_the_released_values(method):
    cls = all_methods()[method]
    differ = set()
    for opt in cls.options:
        value, where = released(method, opt.name)
        assert opt.released_value == value, (
            f"{method} {opt.name}: declares released {opt.released_value!r}, the released code "
            f"has {value!r} ({where})")
        if opt.default != value:
            assert opt.differs, f"{method} {opt.name}: default {opt.default!r} != released"
            differ.add((method, opt.name))
    assert differ == {k for k in DIFFERS if k[0] == method}


def test_every_method_tunes_something_or_says_why_not():
    for method in BUILT_IN:
        searched = [o.name for o in all_methods()[method].options if o.search]
        if method in NOTHING_TO_TUNE:
            assert not searched, f"{method} searches {searched}: drop it from NOTHING_TO_TUNE"
            assert NOTHING_TO_TUNE[method].strip()
        else:
            assert searched, (f"{method} declares no search range: give its strength one "
                              "(search=Search(...)) or add it to NOTHING_TO_TUNE with why")
    assert set(NOTHING_TO_TUNE) <= set(BUILT_IN)


@pytest.mark.parametrize("method,option", SEARCHED)
def test_a_searched_range_holds_the_released_value(method, option):
    """Tuning starts from the authors' setting: their value is one the search can draw."""
    opt = next(o for o in all_methods()[method].options if o.name == option)
    value, where = released(method, option)
    key = (method, option) if method not in SAME_AS else (SAME_AS[method], option)
    values = (value,) if value is not None else RUN_TIME_RELEASED.get(key)
    assert values, (f"{method} {option}: released at run time ({where}); give the values it runs "
                    "with in RUN_TIME_RELEASED")
    held = [searched_range_holds(opt.search, v) for v in values]
    if (method, option) in OUTSIDE_RELEASED:
        assert not all(held), f"{method} {option} holds its released value: not an exception"
        assert OUTSIDE_RELEASED[(method, option)].strip()
    else:
        assert all(held), (f"{method} {option}: {opt.search.describe()} leaves out the released "
                           f"{values} ({where})")


@pytest.mark.parametrize("method", BUILT_IN)
def test_searched_options_are_strengths_and_windows_stay_windows(method):
    """A search is a number (a variant, a str or bool switch, is its own bench row), passes the
    declaration check, and no draw puts the window's end before its start."""
    from avtrain.options import check_declaration

    cls = all_methods()[method]
    check_declaration(method, cls.options, cls.prefix())
    for opt in cls.options:
        assert opt.search is None or opt.type in (int, float), f"{method} searches {opt.name}"
    opts = {o.name: o for o in cls.options}
    if {"modulation_start", "modulation_end"} <= set(opts):
        start, end = opts["modulation_start"], opts["modulation_end"]
        latest_start = start.search.high if start.search else start.default
        earliest_end = end.search.low if end.search else end.default
        assert earliest_end is None or latest_start <= earliest_end, method


@pytest.mark.parametrize("method", BUILT_IN)
def test_avtrain_methods_shows_what_is_tuned(method):
    """`avtrain methods NAME`: each option's row says its range or that it is not tuned."""
    from avtrain.balance.describe import describe

    cls = all_methods()[method]
    rows = {line.split(" | ")[0].strip("| `"): line for line in describe(method).splitlines()
            if line.startswith("| `--")}
    for opt in cls.options:
        cell = (f"tuned over {opt.search.describe()}" if opt.search else "not tuned")
        assert f" | {cell} | " in rows[opt.flag_name(cls.prefix())], (method, opt.name)


def explicit_defaults(cls) -> dict:
    """Every declared option given at its declared default, as a config layer."""
    layer = {"method_options": {o.name: o.default for o in cls.options if not o.shared}}
    layer.update({o.name: o.default for o in cls.options if o.shared})
    return layer


@pytest.mark.parametrize("method", EVERY)
def test_balancer_runs_with_its_declared_defaults(registry, method):
    """An empty config and every option given at its declared default build the same balancer
    and take the same step: no literal default of the module's own is left in the way."""
    cls = registry[method]
    if cls.teacher_setting:
        pytest.skip("needs finished teacher runs (test_unimodal_teacher_released.py)")
    results = []
    for layer in ({}, explicit_defaults(cls)):
        result = drive(method, epochs=1, steps=1, bn=True, settings=layer, tuned=False)
        results.append(result)
    a, b = results
    assert a["opt"] == b["opt"] == {o.name: o.default for o in cls.options}
    for name, value in a["params"].items():
        assert torch.equal(value, b["params"][name]), name
    assert a["metrics"] == b["metrics"]


# --- (d) options round-trip through config.yaml; (e) bad values are refused -------------------


def other_value(opt, default):
    """A valid value of `opt` that is not `default`."""
    if opt.choices:
        return next(c for c in opt.choices if c != default)
    if opt.type is bool:
        return not default
    if opt.type is list:
        return ["audio=RUN_A", "visual=RUN_V"]
    if opt.type is str:
        return "0.2,0.3,0.5"  # G-Blending's fixed weights: the only free-text option
    lo = opt.minimum if opt.minimum is not None else 0
    step = 1 if opt.type is int else 0.25
    candidates = [lo + step] if default is None else [default + step, default - step,
                                                      (default + lo) / 2]
    for value in candidates:
        try:
            if opt.coerce(value, "x") != default:
                return opt.type(value)
        except Exception:  # outside the bounds: the next one
            continue
    raise AssertionError(f"no other valid value for {opt.name}")


def other_values(cls) -> dict:
    values = {o.name: other_value(o, o.default) for o in cls.options}
    if "modulation_end" in values:  # the window stays a window
        start = values.get("modulation_start", 0)
        values["modulation_end"] = max(values["modulation_end"], start + 1)
    return values


def flags(cls, values: dict) -> list[str]:
    out = []
    for opt in cls.options:
        flag, value = opt.flag_name(cls.prefix()), values[opt.name]
        if opt.type is bool:
            out.append(flag if value else f"--no-{flag[2:]}")
        elif opt.type is list:
            for item in value:
                out += [flag, item]
        else:
            out += [flag, str(value)]
    return out


@pytest.mark.parametrize("method", EVERY)
def test_options_round_trip_through_config_yaml(registry, method, tmp_path):
    from avtrain.settings import resolved_options

    cls = registry[method]
    values = other_values(cls)
    out = invoke("fit", *module_args(method), "--method", method, *flags(cls, values),
                 "--print-config")
    assert out.exit_code == 0, out.output
    written = tmp_path / "config.yaml"
    written.write_text(out.output)
    back = invoke("fit", "--config", written, "--print-config")
    assert back.exit_code == 0, back.output
    first, second = yaml.safe_load(out.output), yaml.safe_load(back.output)
    assert first == second
    assert resolved_options(second) == resolved_options(first) == values


def bad_values(opt) -> list:
    """Values the declaration refuses: another word than its choices, a number outside."""
    if opt.choices:
        return ["not-a-choice"]
    bad = []
    if opt.minimum is not None:
        bad.append(opt.minimum if opt.exclusive_minimum else opt.minimum - 1)
    if opt.maximum is not None:
        bad.append(opt.maximum if opt.exclusive_maximum else opt.maximum + 1)
    return bad


BOUNDED = [(m, o.name, v) for m in BUILT_IN for o in all_methods()[m].options
           for v in bad_values(o)]


def edge_values(opt) -> list:
    """The declared bounds themselves, where they are inside (not an exclusive bound)."""
    edges = [] if opt.minimum is None or opt.exclusive_minimum else [opt.minimum]
    edges += [] if opt.maximum is None or opt.exclusive_maximum else [opt.maximum]
    return [opt.type(v) for v in edges]


EDGES = [(m, o.name, v) for m in BUILT_IN if not all_methods()[m].teacher_setting
         for o in all_methods()[m].options for v in edge_values(o)]


@pytest.mark.parametrize("method,option,value", EDGES)
def test_values_at_the_declared_bounds_are_accepted(method, option, value):
    """What the declaration allows the method accepts: no stricter check of its own."""
    cls = all_methods()[method]
    opt = next(o for o in cls.options if o.name == option)
    layer = {option: value} if opt.shared else {"method_options": {option: value}}
    if option == "modulation_end":
        layer["modulation_start"] = 0  # the window stays a window
    t = step_trainer(method, "concat", CLASSES, **layer)
    assert getattr(t.balancer.opt, option) == value


def refused(out, run, flag):
    """Exit 2, one `Error:` line naming the flag, no traceback, nothing written."""
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    errors = [x for x in out.output.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and flag in errors[0], out.output
    # only click's two usage lines may come before a choice error
    rest = [x for x in out.output.splitlines() if x.strip() and not x.startswith("Error:")]
    assert all(x.startswith(("Usage:", "Try ")) for x in rest), out.output
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize("method,option,value", BOUNDED)
def test_bad_option_values_are_refused_before_training(method_shards, tmp_path, method, option,
                                                       value):
    cls = all_methods()[method]
    opt = next(o for o in cls.options if o.name == option)
    run = tmp_path / "run"
    flag = opt.flag_name(cls.prefix())
    out = invoke(*method_fit_args(method, method_shards, run, 1), flag, value)
    refused(out, run, flag)
    error = next(x for x in out.output.splitlines() if x.startswith("Error:"))
    assert (f"Invalid value for '{flag}'" if opt.choices
            else f"{flag} must be {opt.range_text()}, got ") in error, error


CHOICES = [(m, o.name) for m in BUILT_IN for o in all_methods()[m].options if o.choices]


@pytest.mark.parametrize("method,option", CHOICES)
def test_a_word_outside_the_choices_is_one_line_outside_the_cli_flag(method_shards, tmp_path,
                                                                      method, option):
    """Given as --method-option (as config.yaml gives it), not as the click choice flag."""
    cls = all_methods()[method]
    opt = next(o for o in cls.options if o.name == option)
    run = tmp_path / "run"
    out = invoke(*method_fit_args(method, method_shards, run, 1), "--method-option",
                 f"{option}=not-a-choice")
    assert out.exit_code != 0, out.output
    lines = [x for x in out.output.splitlines() if x.strip()]
    assert lines == [f"Error: {opt.flag_name(cls.prefix())} must be one of "
                     f"{', '.join(map(str, opt.choices))}, got 'not-a-choice'"], out.output
    assert not run.exists() or not any(run.iterdir())


# The fusions a method refuses, with the words of its refusal: its model needs per-modality
# logits (or its own fusion) that these fusions do not give.
REFUSED_FUSIONS = {
    "amco": [("film", "--method amco masks per-modality logits")],
    "cml": [("film", "--method cml removes a modality's summand")],
    "mbsd": [("film", "--method mbsd trains the per-modality logits")],
    "lfm": [("film", "--method lfm aligns and classifies")],
    "greedy": [("film", "--greedy-loss unimodal (released: the sum of the branches' CE) needs")],
    "mla": [("sum", "use --fusion concat or shared, not 'sum'")],
    "mmcosine": [("sum", "use --fusion concat or cosine, not 'sum'")],
    "reconboost": [("film", "--fusion boost"), ("cosine", "--fusion boost")],
    "inforeg": [("film", "--method inforeg trains the per-modality logits")],
    "cggm": [("film", "--method cggm compares each classifier")],
    "arl": [("film", "--method arl trains the per-modality logits")],
    "dgl": [("film", "--method dgl needs the parameter-shared unimodal logits")],
}


def one_modality_words(cls) -> str:
    """Greedy's MMTM blocks are defined for audio and visual; the others need two of any."""
    return "defined for those two modalities, got audio" if cls.mmtm else "needs at least two"


def bad_input_rows() -> list:
    """(method, settings, words) that every method refuses before training, from what it
    declares: one modality for every method that balances modalities (all but `none`); a window
    that ends before it starts for every method declaring both window options; a modality the
    shards lack; the fusions of REFUSED_FUSIONS."""
    rows = []
    for method, cls in sorted(all_methods().items()):
        names = {o.name for o in cls.options}
        if method != "none":
            rows.append((method, {"modalities": "audio"}, one_modality_words(cls)))
        if {"modulation_start", "modulation_end"} <= names:
            rows.append((method, {"modulation_start": 2, "modulation_end": 1},
                         "--modulation-end (1) is before --modulation-start (2)"))
        rows.append((method, {"modalities": "audio,visual,text"},
                     "these shards hold no 'text' modality"))
        rows += [(method, {"fusion": f}, words) for f, words in REFUSED_FUSIONS.get(method, [])]
    return rows


@pytest.mark.parametrize("method,settings,words", bad_input_rows())
def test_bad_input_is_one_error_line(method_shards, tmp_path, method, settings, words):
    settings = {**CLI_BATCH.get(method, {}), **settings}  # LFM's held-out piece fits the batch
    assert_fit_refused(method_shards, tmp_path / "run", method, settings, words)


def test_the_example_plugins_bad_option_is_refused(registry, method_shards, tmp_path):
    run = tmp_path / "run"
    out = invoke(*method_fit_args(PLUGIN, method_shards, run, 1), *module_args(PLUGIN),
                 "--unimodal-aux-weight", "-1")
    refused(out, run, "--unimodal-aux-weight")


# --- (g) a plug-in that breaks the interface is one Error line -------------------------------

HEAD = "import torch\nfrom avtrain.balance import Balancer, Option, Search\n\n"
BROKEN = {
    "not_a_balancer": ("class Thing:\n    name = 'thing'\n", "defines no subclass"),
    "no_hook": ("class Lazy(Balancer):\n    name = 'lazy'\n", "overrides none of the hooks"),
    "wrong_signature": ("class Odd(Balancer):\n    name = 'odd'\n"
                        "    def loss(self, logits):\n        return logits['fused'].sum()\n",
                        "cannot be called as the loop calls it"),
    "colliding_option": ("class Clash(Balancer):\n    name = 'clash'\n"
                         "    option_prefix = 'mmpareto'\n"
                         "    options = (Option('gamma', float, 3.0, 'another gamma'),)\n"
                         "    def loss(self, logits, labels, *, epoch, step):\n"
                         "        return torch.nn.functional.cross_entropy(logits['fused'], labels)\n",
                         "--mmpareto-gamma"),
    "empty_search": ("class Empty(Balancer):\n    name = 'empty'\n"
                     "    options = (Option('w', float, 1.0, 'a weight', minimum=0,\n"
                     "                      search=Search(2.0, 1.0, log=True)),)\n"
                     "    def loss(self, logits, labels, *, epoch, step):\n"
                     "        return torch.nn.functional.cross_entropy(logits['fused'], labels)\n",
                     "the range 2.0..1.0 is empty"),
    "search_outside_bounds": ("class Wide(Balancer):\n    name = 'wide'\n"
                              "    options = (Option('w', float, 1.0, 'a weight', minimum=0,\n"
                              "                      search=Search(-1.0, 1.0)),)\n"
                              "    def loss(self, logits, labels, *, epoch, step):\n"
                              "        return torch.nn.functional.cross_entropy(logits['fused'], "
                              "labels)\n",
                              "must be 0 or more, got -1.0"),
    "taken_name": ("class Again(Balancer):\n    name = 'ogm'\n"
                   "    def loss(self, logits, labels, *, epoch, step):\n"
                   "        return torch.nn.functional.cross_entropy(logits['fused'], labels)\n",
                   "is taken"),
}


def plugin_file(tmp_path, name, body) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(HEAD + body)
    return path


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_plugin_is_one_error_line(registry, method_shards, tmp_path, name):
    body, words = BROKEN[name]
    path = plugin_file(tmp_path, name, body)
    method = body.split("name = '")[1].split("'")[0] if "name = '" in body else "none"
    run = tmp_path / "run"
    out = invoke(*method_fit_args(method, method_shards, run, 1), "--method-module", path)
    assert out.exit_code == 2, out.output
    lines = [x for x in out.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), out.output
    assert words in lines[0] and str(path) in lines[0], lines[0]
    assert not run.exists() or not any(run.iterdir())


def test_a_plugin_loss_that_is_not_a_tensor_stops_at_the_first_step(registry, method_shards,
                                                                    tmp_path):
    path = plugin_file(tmp_path, "floaty", "class Floaty(Balancer):\n    name = 'floaty'\n"
                       "    def loss(self, logits, labels, *, epoch, step):\n        return 1.0\n")
    run = tmp_path / "run"
    out = invoke(*method_fit_args("floaty", method_shards, run, 1), "--method-module", path)
    assert out.exit_code != 0, out.output
    lines = [x for x in out.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), out.output
    assert "floaty" in lines[0] and str(path) in lines[0] and "float" in lines[0], lines[0]
    assert not (run / "last.pt").exists()


# --- the step driver: the loop's order on fixed batches (for (f) and (a)) ---------------------

# settings under which each method acts within a few tiny steps (the contract, not the rule)
DRIVE = {
    "ogm": {"alpha": 0.8}, "ogm_ge": {"alpha": 0.8}, "olm": {"olm_lr": 0.05},
    "olm_com": {"olm_lr": 0.05}, "opm": {"modulation_start": 0},
    "greedy": {"modulation_start": 0, "greedy_epsilon": 0.0, "greedy_window": 1},
    "relearning": {"relearning_every": 1, "relearning_kmeans": "torch"},
    "gblending": {"gblending_super_epoch": 2}, "reconboost": {"reconboost_stage_epochs": 1},
    "valuation": {"valuation_warmup": 1}, "lfm": {"lfm_heldout_size": GLOBAL},
    "agm": {"agm_clip": 0.02, "alpha": 2.5}, "mla": {"mla_projection": "owm"},
    "remix": {"remix_warmup": 1},
    "arl": {"modulation_start": 1},
}
# step metrics that are one rank's own (not reduced over the ranks) by design
LOCAL_METRICS = {"cml": ("conf_fused", "conf_subset"), PLUGIN: ("aux_audio", "aux_visual")}
# what each method's rule doing something looks like in its logged metrics (the driver's settings
# above make it act; a method not listed is held to `not the plain run` alone)
ACTED = {
    "agm": lambda m: m["agm_clipped"] > 0 and abs(m["agm_coeff_audio"] - 1) > 0.02,
    "amco": lambda m: m["mask_ratio"] > 0 and m["dependent_audio"] + m["dependent_visual"] > 0,
    "cml": lambda m: m["penalty"] > 0,
    "mbsd": lambda m: m["mbsd_weighted"] > 0,
    "opm": lambda m: m["drop_exe"] > 0 and m["dropped_audio"] + m["dropped_visual"] > 0,
    "greedy": lambda m: m["rebalance_audio"] + m["rebalance_visual"] > 0,
    "relearning": lambda m: "purity_val_audio" in m,
    "mmcosine": lambda m: "mmcosine_logit_audio" in m,
    "gblending": lambda m: abs(m["gblend_w_audio"] - 1 / 3) > 1e-3,  # estimated, not the start
    "inforeg": lambda m: m["inforeg_beta_audio"] + m["inforeg_beta_visual"] > 0,
    "cggm": lambda m: abs(m["cggm_coeff_audio"] - 1) > 1e-3,
    "arl": lambda m: m["arl_scale_audio"] == 1.5,
}
# the fusion a method is released with where the driver's concat would leave a signal out
# (ReconBoost's boost_rate is BoostFusion's)
FUSION = {"reconboost": "boost"}
# epochs the driver and the CLI runs take where 2 are too few for the rule to act (relearning's
# first re-initialisation is before epoch 2: after the first multiple of --relearning-every > 0)
EPOCHS = {"relearning": 3}
# initial weights under which a rule acts in the driver's few steps (CML's global hinge)
SEED = {"cml": 2}
# methods whose effect the driver cannot show in the weights: valuation re-samples the data (the
# driver's batches are fixed); relearning's re-initialisation weight is tanh(lam * |purity gap|),
# 0 for the tiny model's equal purities
NOT_IN_WEIGHTS = {"none", "valuation", "relearning"}
# balancer state that is one rank's own by design: OLM-Com's latest held-out losses (recomputed
# every step before they are used, reduced over the ranks when they are)
LOCAL_STATE = {"olm_com": ("val_now",)}
# G-Blending's weights are ratios of loss differences: they magnify the ranks' summation order
METRIC_RTOL = {"gblending": 1e-4}


def keyed(seed: int, n: int, split: str, part) -> list[dict]:
    out = []
    for i, item in enumerate(make_batches(seed, GLOBAL, n, CLASSES)):
        batch = as_batch(item)
        batch["key"] = [f"{split}{i}_{j}" for j in range(GLOBAL)]
        out.append({k: v[part] for k, v in batch.items()})
    return out


def drive(method: str, rank: int = 0, world: int = 1, *, epochs: int | None = None, steps: int = 2,
          bn: bool = False, settings: dict | None = None, tuned: bool = True,
          seed: int | None = None) -> dict:
    """start_epoch, the epoch's steps (with a held-out batch where the method reads one),
    end_epoch, as Trainer.train_epoch; rank `rank` of `world` takes its share of every global
    batch, and the epoch-level streams are shared out the same way (eval batches whole)."""
    epochs = EPOCHS.get(method, 2) if epochs is None else epochs
    torch.manual_seed(SEED.get(method, 0) if seed is None else seed)
    layer = {**(DRIVE.get(method, {}) if tuned else {}), **(settings or {})}
    t = step_trainer(method, FUSION.get(method, "concat"), CLASSES, bn=bn, optimizer="sgd", lr=0.05, seed=1,
                     batch_size=GLOBAL // world, **layer)
    per = GLOBAL // world
    part = slice(rank * per, (rank + 1) * per)
    data = make_batches(7, GLOBAL, epochs * steps, CLASSES)
    held = iter([as_batch(x, part) for x in make_batches(11, GLOBAL, epochs * steps, CLASSES)])

    def context(epoch):
        def batches(n):
            return iter([as_batch(x, part) for x in make_batches(8 + epoch, GLOBAL, n, CLASSES)])

        def eval_batches(split):
            whole = keyed(9 if split == "val" else 10, 4, split, slice(None))
            return iter(whole[rank::world])

        return EpochContext(net=t.net, model=t.model, epoch=epoch, batches=batches,
                            steps_per_epoch=steps, eval_batches=eval_batches, val_split="val")

    metrics, step = [], 0
    for epoch in range(epochs):
        t.balancer.start_epoch(context(epoch))
        t.net.train()
        for _ in range(steps):
            t.step = step
            t.train_step(as_batch(data[step], part), epoch,
                         held if t.balancer.needs_heldout else None)
            m = {k: float(v) for k, v in t.balancer.step_metrics().items()}
            for key in LOCAL_METRICS.get(method, ()):
                m.pop(key, None)
            metrics.append(m)
            step += 1
        t.balancer.end_epoch(epoch)
    return {"params": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
            "metrics": metrics, "opt": dict(vars(t.balancer.opt)),
            "state": {k: v for k, v in t.balancer.state_dict().items()
                      if k not in LOCAL_STATE.get(method, ())}}


# --- (a) 2 gloo processes = 1 process with the global batch (slow) ----------------------------

TEACHERS = {m for m, cls in all_methods().items() if cls.teacher_setting}
GLOO = [m for m in EVERY if m not in TEACHERS]  # teachers need finished runs: their own file


def _every_method_on_ranks(rank: int, world: int) -> dict:
    """One gloo group for all methods (one spawn, not 21): each method's result or its error."""
    load_method_module(EXAMPLE)
    out = {}
    for method in GLOO:
        try:
            out[method] = drive(method, rank, world)
        except Exception as exc:  # reported by the method's own test
            out[method] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    return run_gloo(_every_method_on_ranks, tmp_path_factory.mktemp("contract-gloo"))


@pytest.mark.slow
@pytest.mark.parametrize("method", GLOO)
def test_two_gloo_processes_equal_one_with_the_global_batch(registry, gloo_results, method):
    ranks = [r[method] for r in gloo_results]
    for r in ranks:
        assert "error" not in r, r.get("error")
    one = drive(method)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert len(one["metrics"]) == len(ranks[0]["metrics"])
    for got, want in zip(ranks[0]["metrics"], one["metrics"]):
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=METRIC_RTOL.get(method, 1e-5),
                                             abs=1e-6), key
    for name, value in one["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=name)
    assert_same_state(ranks[0]["state"], ranks[1]["state"])
    assert_same_state(ranks[0]["state"], one["state"], rtol=METRIC_RTOL.get(method, 1e-5),
                      atol=1e-6)
    start = drive(method, epochs=0)["params"]
    moved = any(not torch.equal(start[n], v) for n, v in one["params"].items())
    assert moved  # it trained
    if method not in NOT_IN_WEIGHTS:  # and the method acted: not the plain run's weights
        plain = drive("none", seed=SEED.get(method, 0))["params"]
        assert any(n not in plain or not torch.allclose(plain[n], v, rtol=1e-4, atol=1e-5)
                   for n, v in one["params"].items()), f"{method} trained as `none` does"
    acted = ACTED.get(method)
    assert acted is None or any(acted(m) for m in one["metrics"]), f"{method} never acted"


# --- (b) exact --resume, (c) a one-epoch CLI run logs its signal and is reported (slow) --------


CLI_BATCH = {"lfm": {"lfm_heldout_size": 4}}  # the CLI runs' batch is 4
# (epochs of the short run, epochs of the full run, flags) where the default (1, 2) would resume
# where the method's state does not matter: AGM holds its last scale after its window; ReconBoost
# resumes inside a learner phase; relearning before its re-initialisation; G-Blending resumes
# with the state's weights (epoch 1) and re-estimates after it (epoch 2); None: a bare flag
CLI_RUNS = {
    "agm": (1, 2, {"modulation_end": 0}),
    "amco": (1, 2, {"linear_probe": None}),  # the probe rebuilds AMCo's output-layer model
    "reconboost": (1, 4, {"fusion": "boost", "reconboost_stage_epochs": 2,
                          "reconboost_correct_epochs": 1}),
    "relearning": (2, 3, {}),
    "gblending": (1, 3, {}),
}


def cli_flags(method: str) -> list[str]:
    out = module_args(method)
    extra = {**DRIVE.get(method, {}), **CLI_BATCH.get(method, {}),
             **CLI_RUNS.get(method, (1, 2, {}))[2]}
    for key, value in extra.items():
        out += [f"--{key.replace('_', '-')}"] + ([] if value is None else [str(value)])
    return out


@pytest.fixture(scope="module")
def cli_runs(method_shards, tmp_path_factory):
    """Per method, once: a short CLI run (one epoch unless CLI_RUNS says) and the full run it is
    resumed to; (c) reads them, (b) resumes a copy of the short one."""
    root, done = tmp_path_factory.mktemp("contract-runs"), {}

    def runs(method: str) -> dict:
        if method not in done:
            short, full, _ = CLI_RUNS.get(method, (1, 2, {}))
            done[method] = {"epochs": (short, full)}
            for name, epochs in (("short", short), ("full", full)):
                run = root / method / name
                out = invoke(*method_fit_args(method, method_shards, run, epochs),
                             *cli_flags(method))
                assert out.exit_code == 0, out.output
                done[method][name] = run
        return done[method]

    return runs


def signal_keys(cls, modalities) -> list[str]:
    """The declared signals with <m> as each modality, <branch> as each modality and `fused`."""
    patterns = {"<m>": list(modalities), "<branch>": [*modalities, "fused"]}
    out = []
    for key in cls.signals:
        pattern = next((p for p in patterns if p in key), None)
        out += [key] if pattern is None else [key.replace(pattern, x) for x in patterns[pattern]]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", GLOO)
def test_one_epoch_cli_run_logs_its_signal_and_report_draws_it(registry, cli_runs, tmp_path,
                                                               method):
    """Every declared signal key is logged by the end of the full run, and one of them at every
    step of its last epoch; `avtrain report` draws them; the best checkpoint evaluates (the
    model the method built rebuilds from its spec)."""
    import json

    from test_balance_ogm import step_records

    from avtrain.report import balancing_keys, load_run

    cls = registry[method]
    runs = cli_runs(method)
    short, full = runs["short"], runs["full"]
    summary = json.loads((short / "summary.json").read_text())
    assert summary["method"] == method
    keys = signal_keys(cls, summary["modalities"])
    assert keys or method == "none", f"{method} declares no signal"
    assert len(step_records(short)) == 3 * runs["epochs"][0]
    steps = step_records(full)
    assert len(steps) == 3 * runs["epochs"][1]
    last = steps[-3:]  # valuation logs from its first re-sampling (after the warm-up) on
    assert not keys or any(all(key in r for r in last) for key in keys), \
        f"{method}: no declared signal at every step of the last epoch"
    for key in keys:
        assert any(key in r for r in steps), f"{key} never logged"
    assert set(keys) <= set(balancing_keys(load_run(str(full))))
    out = invoke("report", full, "-o", tmp_path / "report")
    assert out.exit_code == 0, out.output
    figures = sorted(p.name for p in (tmp_path / "report").glob("balance_*.png"))
    assert figures == ([] if not keys else [f"balance_{full.name}.png"]), figures
    out = invoke("eval", "--ckpt", short / "best.pt", "--split", "val", "--workers", "0",
                 "--device", "cpu", "--json", "--no-shapley")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["acc"] == pytest.approx(summary["val"]["acc"])


@pytest.mark.slow
@pytest.mark.parametrize("method", GLOO)
def test_resume_after_an_epoch_is_exact(registry, cli_runs, tmp_path, method):
    """--resume of the short run gives the full run's weights, balancer state and every logged
    value of the resumed epochs (the balancer's state included in what matters)."""
    from test_balance_ogm import step_records

    from avtrain.checkpoint import load_checkpoint

    runs = cli_runs(method)
    (short, epochs), full, part = runs["epochs"], runs["full"], tmp_path / "part"
    shutil.copytree(runs["short"], part)
    out = invoke("fit", "--resume", part, "--epochs", epochs, *module_args(method))
    assert out.exit_code == 0, out.output
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(part / "last.pt"))
    assert a["step"] == b["step"] == 3 * epochs and a["epoch"] == b["epoch"] == epochs - 1
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-6, atol=1e-7,
                                   msg=key)
    assert_same_state(b["balancer"], a["balancer"])
    untimed = [[{k: v for k, v in r.items() if k != "time"} for r in step_records(run)
                if r["epoch"] >= short] for run in (full, part)]
    assert len(untimed[1]) == 3 * (epochs - short)
    assert len(untimed[0]) == len(untimed[1])
    for want, got in zip(*untimed):
        assert got.keys() == want.keys()
        for key in want:
            if isinstance(want[key], (int, float)):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
            else:
                assert got[key] == want[key], key


def assert_same_state(got, want, where="balancer", rtol=1e-6, atol=1e-7):
    """Two balancer state_dicts hold the same values (tensors and floats to tolerance)."""
    tol = {"rtol": rtol, "atol": atol}
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_state(got[key], want[key], f"{where}[{key!r}]", **tol)
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_state(g, w, f"{where}[{i}]", **tol)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, msg=where, **tol)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rtol, abs=atol), where
    else:
        assert got == want, where


# --- every method with a second encoder family: a timm model (issue #30) ----------------------

TIMM = "timm:test_resnet"  # timm's own small ResNet (random weights): its stages, its names
# one CLI epoch of one step with the timm encoders; where a method logs nothing in that step its
# declared signals are not asked for: `none` declares none, valuation logs from its first
# re-sampling, after its warm-up epoch, and remix from its first remixed epoch, after its warm-up
TIMM_SILENT_FIRST_STEP = {"none", "valuation", "remix"}


@pytest.mark.parametrize("method", GLOO)
def test_every_method_steps_with_a_timm_encoder(registry, method):
    """The contract driver's epoch with timm encoders: finite weights, and the method logs the
    same metrics as with the tiny CNN (OGM's conv rule, Greedy's MMTM stages, the shared heads'
    widths all meet a model that is not ours)."""
    settings = {"model": TIMM}
    got = drive(method, epochs=1, steps=1, bn=True, settings=settings)
    want = drive(method, epochs=1, steps=1, bn=True)
    assert all(torch.isfinite(v).all() for v in got["params"].values()
               if v.is_floating_point()), method
    assert [sorted(m) for m in got["metrics"]] == [sorted(m) for m in want["metrics"]]
    assert any(k.startswith("encoders.visual.backbone.layer1.") for k in got["params"])


@pytest.mark.slow
@pytest.mark.parametrize("method", GLOO)
def test_one_step_cli_run_with_a_timm_encoder(registry, method_shards, tmp_path, method):
    """`avtrain fit --model timm:...`: one step, a finite loss, the method's signals logged,
    the checkpoint's spec names the encoder."""
    from test_balance_ogm import step_records

    from avtrain.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = [*method_fit_args(method, method_shards, run, 1), *cli_flags(method),
            "--model", TIMM, "--steps-per-epoch", "1", "--no-shapley"]
    i = args.index("--model")  # method_fit_args' tiny is replaced
    del args[i:i + 2]
    out = invoke(*args)
    assert out.exit_code == 0, out.output
    (record,) = step_records(run)
    assert math.isfinite(record["loss"])
    keys = signal_keys(registry[method], ["audio", "visual"])
    if method not in TIMM_SILENT_FIRST_STEP:
        assert any(key in record for key in keys), (method, sorted(record))
    assert load_checkpoint(str(run / "last.pt"))["spec"]["model"] == TIMM
