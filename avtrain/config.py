"""The training configuration: one dataclass, defaults < YAML file < command-line flags.

Every setting a run uses is a field here, so `RUN/config.yaml` records the whole run and
`avtrain fit --config RUN/config.yaml` repeats it. YAML keys are the field names (dashes are
accepted for underscores); unknown keys are an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from avprep.errors import UserError
from avprep.outputs import check_output_dir

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("step", "cosine", "none")


@dataclass
class TrainConfig:
    recipe: str | None = None  # a paper's protocol (avtrain/recipes/NAME.yaml) under these settings
    shards: str | None = None  # folder or s3://, gs://, https:// prefix holding index.json + tars
    cache_dir: str | None = None  # remote shards: local cache of tars read (off when unset)
    cache_size: str | None = None  # its bound, e.g. 20G [default: 10G]
    run_dir: str | None = None
    method: str = "none"  # balancing method (avtrain.balance.METHODS)
    model: str = "resnet18"  # encoder: resnet18 | tiny; or a sequence model: emt | mbt | umt | ca
    model_options: dict = field(default_factory=dict)  # sequence models: d_model, heads, ...
    folds: int | None = None  # k-fold cross-validation over train+val (avtrain.folds)
    fusion: str = "concat"
    modalities: list[str] = field(default_factory=lambda: ["audio", "visual"])
    epochs: int = 30
    batch_size: int = 64  # per process (rank)
    global_batch_size: int | None = None  # if set: batch_size = this / processes (papers' 64)
    eval_batch_size: int | None = None  # default: batch_size
    steps_per_epoch: int | None = None  # default: train samples // (batch_size · world size)
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "step"
    lr_step: int | None = None  # StepLR step in epochs; None: 70 % of epochs (released 70/100)
    lr_gamma: float = 0.1
    clip_grad: float | None = None  # max global grad norm; None: no clipping
    frames: int | None = None  # frames per clip; default: the preset's train_frames
    image_size: int = 224
    crop_columns: int | None = None  # spectrogram crop; default: the preset's train_crop_columns
    # eval/test-time transforms (avtrain.decode): defaults are deterministic; the alternatives are
    # what the released OGM-GE / OLM loaders do, for recipes that reproduce them
    eval_crop: str = "centre"  # centre | random (VGGSound test loader; seeded by seed + key)
    eval_resize: str = "crop"  # crop (short side + centre crop) | square (Resize((224, 224)))
    train_crop: str = "clip"  # clip (one RandomResizedCrop+flip per clip) | frame (per frame)
    workers: int = 2  # data loader processes per rank
    # exact: every train sample once per epoch, order a function of (seed, epoch) (avtrain.sampling)
    # resample: shards drawn with replacement + a shuffle buffer (web-scale sets)
    sampling: str = "exact"
    shuffle_buffer: int = 1000  # resample only
    strict: bool = False  # a damaged sample stops the run (one Error line) instead of skipped
    # train (one pass over train) | shorter (the shorter of the train and held-out passes:
    # OLM-com's released zip(train, held-out), engines/engine_logits_com.py)
    epoch_steps: str = "train"
    decode_device: str = "cpu"  # cpu | cuda (JPEG decoding with torchvision on the GPU)
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast, on CUDA only
    compile: bool = False  # torch.compile the model
    # weight init after building: torch (PyTorch's defaults) | ogm_ge (the released OGM-GE
    # weight_init on the whole model: xavier-normal Linear, kaiming fan_out Conv2d, BN 1/0)
    init: str = "torch"
    seed: int = 0
    log_every: int = 10  # steps between per-step log records
    val_split: str = "val"
    test_split: str = "test"
    linear_probe: bool = False  # after training: linear probe of the best checkpoint's encoders
    shapley: bool = True  # after training: each modality's Shapley share of the best's accuracy
    probe_every: int | None = None  # probe each encoder every N epochs on a subset (imbalance.py)
    progress: bool = True  # tqdm bar per epoch
    tensorboard: bool = True
    # options of the balancing methods (passed to the balancer as its config)
    alpha: float | None = None  # OGM(-GE) α; None: the dataset's recommended value, else 0.8
    modulation_start: int | None = None  # None: the method's default (0; OPM 6)
    modulation_end: int | None = None  # None: the method's default (OGM 50, PMR 100, OPM none)
    modulate: str = "conv"  # conv | encoder: which encoder parameters OGM scales
    olm_initial: str = "mean"  # mean | last-batch (the released code's)
    olm_lr: float | None = None  # OLM coefficient Adam lr; None: 1e-3 (CNNs), the network lr (emt..)
    olm_weight_decay: float | None = None  # ... its weight decay; None: 0 (CNNs), --weight-decay (emt..)
    olm_reduction: str = "sum"  # sum (released) | mean: OLM's network CE over the batch
    olm_heldout: str = "train"  # train | eval: mode and transforms of OLM-com's held-out forward
    pmr_momentum: float | None = None  # PMR prototype momentum; None: 0.2 (released default)
    pmr_proto_batches: int | None = None  # PMR prototype batches; None: steps per epoch // 10
    opm_q_base: float | None = None  # OPM base drop probability; None: 0.5 (released)
    opm_p_exe: float | None = None  # OPM probability that a step drops at all; None: 0.7
    opm_theta_grad: str = "released"  # released (theta as its own gradient) | none
    reconboost_stage_epochs: int | None = None  # ReconBoost learner-phase epochs a stage; None: 4
    reconboost_correct_epochs: int | None = None  # ... rectification epochs; None: stage epochs
    reconboost_weight1: float | None = None  # ReconBoost boosting loss w1; None: 5.0 (released)
    reconboost_weight2: float | None = None  # ... w2 of the reconcilement term; None: 1.0
    reconboost_reset_optimizer: bool | None = None  # fresh optimizer state each phase; None: on
    agm_cap: float | None = None  # AGM cap of optimal - ratio in its coefficient; None: 10
    agm_clip: float | None = None  # AGM's conditional gradient clipping; None: 1.0, 0: off
    agm_after_window: str = "hold"  # hold (released: last coefficients stay) | reset (1)
    agm_floor: float | None = None  # AGM score probability floor; None: 1e-8 (CREMA-D), 0: none
    amco_sigma: float | None = None  # AMCo dependence threshold on the softmax share; None: 0.5
    amco_eps: float | None = None  # AMCo mask ramp length (l_t units); None: 0.3 (BalanceMM)
    greedy_epsilon: float | None = None  # Greedy threshold on |d BDR|; None: 0.01 (released)
    greedy_window: int | None = None  # Greedy re-balancing steps per window; None: 5 (released)
    greedy_loss: str = "unimodal"  # unimodal (released: sum of branch CEs) | fused (BalanceMM)
    greedy_average: str = "own"  # own | released: the MMTM running means of Greedy's steps
    mla_projection: str = "none"  # MLA head-gradient edit: none (released) | owm | owm-add
    mla_gate: str = "entropy"  # MLA test-time fusion: entropy | batch-entropy (released) | fixed
    mla_stale_grads: str = "zero"  # MLA zero_grad between modalities: zero (released) | none
    relearning_lambda: float | None = None  # Re-learning tanh(lambda * purity gap); None: 3
    relearning_every: int | None = None  # Re-learning after every N-th epoch; None: 20
    relearning_times: int | None = None  # Re-learning at most this many times; None: 3
    relearning_kmeans: str = "torch"  # torch | sklearn: Re-learning's k-means
    relearning_n_init: int | None = None  # Re-learning k-means runs (best inertia); None: 10
    mmpareto_gamma: float | None = None  # MMPareto gradient factor; None: 1.5 (released gamma)
    valuation_level: str = "sample"  # valuation: sample | modality (the two released scripts)
    valuation_warmup: int | None = None  # valuation: epochs as they are; None: 5 (released)
    valuation_part_ratio: float | None = None  # valuation modality level: Z; None: 0.2 (released)
    valuation_alpha: float | None = None  # valuation modality level; None: 1 (released)
    cml_lam: float | None = None  # CML weight of the confidence hinge; None: 0.1 (BalanceMM lam)
    cml_form: str = "balancemm"  # CML hinge: balancemm (on the batch sum) | authors (per sample)
    mbsd_rs_on: str = "auto"  # MBSD RS term on: auto (BalanceMM: logits for 2, probs for 3+) |
    # logits | probs
    lfm_schedule: str = "learnable"  # LFM weights: learnable (paper, released) | fitted
    lfm_alpha_init: float | None = None  # LFM initial a_align; None: 0.95 (authors; BalanceMM 0.05)
    lfm_lr_alpha: float | None = None  # LFM lr of a_align; None: 1e-4 (released)
    lfm_cls_input: str = "mean"  # LFM CE input: mean of unimodal logits (authors) | fused
    lfm_alpha_mode: str = "released"  # LFM alpha step: released (train at epoch 0) | train
    lfm_heldout_size: int | None = None  # LFM held-out samples; None: 8 (authors' 16 // 2)
    gblending_super_epoch: int | None = None  # G-Blending re-estimate period in epochs; None: 10
    # (BalanceMM trainer_config.yaml)
    gblending_offline: bool | None = None  # G-Blending one estimate before training (BalanceMM
    # method: offline); None: False (BalanceMM's default method: online)
    gblending_weights: str | None = None  # G-Blending fixed weights 'w_audio,w_visual,...,w_fused'
    # (the authors' VMZ flags); None: estimated (BalanceMM)
    mmcosine_scaling: float | None = None  # MMCosine s; None: 10 (authors' main_CD.py; BalanceMM 15)
    mmcosine_eval_fused: str = "concat"  # MMCosine eval fused logits: concat (authors') | cosine
    # unimodal_teacher: MODALITY=RUN_DIR per modality (--teacher, repeatable; or a mapping)
    unimodal_teacher_runs: list[str] = field(default_factory=list)
    unimodal_teacher_scaling: float | None = None  # MSE weight; None: 10 (BalanceMM scaling)
    unimodal_teacher_mode: str = "train"  # teachers' mode: train (BalanceMM) | eval

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _kind(annotation: str):
    """The number or bool type of a field from its annotation ("float | None" -> float), so a
    method's new option needs only its field: YAML's 1 becomes 1.0, "true" becomes True."""
    first = str(annotation).split("|")[0].strip()
    return {"int": int, "float": float, "bool": bool}.get(first)


_KINDS = {name: _kind(f.type) for name, f in FIELDS.items()}


def _normalise_keys(data: dict, source: str) -> dict:
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise UserError(f"{source}: unknown setting {key!r}")
        out[name] = value
    return out


def load_yaml(path: str) -> dict:
    """Settings from a YAML file (a mapping of field names)."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return _normalise_keys(data, path)


def _coerce(name: str, value):
    """YAML gives ints for floats and strings for lists; make the types what the loop expects."""
    if value is None:
        return None
    if name == "modalities":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return list(value)
    if name == "model_options":
        return parse_model_options(value)
    kind = _KINDS.get(name)
    try:
        if kind is bool and isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if kind in (int, float):
            return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"setting {name!r}: expected a number, got {value!r}") from None
    return value


def parse_model_options(value) -> dict:
    """A mapping, or KEY=VALUE strings (repeated --model-option), values read as YAML."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        value = [value]
    out = {}
    for item in value or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"--model-option expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    return out


def merge(*layers: dict) -> TrainConfig:
    """Layers of settings merged left to right (later wins) over the defaults, not yet checked:
    `avtrain.settings.make_config` merges and checks."""
    merged: dict = {}
    for layer in layers:
        merged.update(_normalise_keys(layer or {}, "settings"))
    return TrainConfig(**{k: _coerce(k, v) for k, v in merged.items()})


def check(config: TrainConfig, method) -> None:
    """Reject settings that cannot work, with one line each (before anything is loaded).
    `method`: the balancer class `config.method` names (avtrain.balance.get_method; its caller
    looks it up, so this module never imports the methods, which read it)."""
    from avtrain.models import ENCODERS, FUSIONS, MODALITIES, SEQUENCE_MODELS
    from avtrain.models.init import INITS
    from avtrain.models.sequence import DEFAULTS

    if config.unimodal_teacher_runs and config.method != "unimodal_teacher":
        raise UserError(f"--teacher is read only by --method unimodal_teacher, not "
                        f"{config.method}; drop it or change the method")
    if config.recipe is not None:
        from .recipes import load_recipe

        load_recipe(config.recipe)
    if config.val_split == config.test_split and config.folds:
        raise UserError("--folds chooses each fold's best epoch on its own val; it cannot use "
                        f"--val-split {config.val_split}")
    sequence = config.model in SEQUENCE_MODELS
    if config.model not in ENCODERS and not sequence:
        raise UserError(f"unknown model {config.model!r}; choose one of: "
                        f"{', '.join(sorted([*ENCODERS, *SEQUENCE_MODELS]))}")
    if config.fusion not in FUSIONS and not sequence:
        raise UserError(f"unknown fusion {config.fusion!r}; choose one of: {', '.join(FUSIONS)}")
    for m in config.modalities:
        if m not in MODALITIES and not sequence:  # sequence models take any feature modality
            raise UserError(f"unknown modality {m!r}; choose from: {', '.join(MODALITIES)}")
    if config.model_options and not sequence:
        raise UserError(f"--model-option applies to the sequence models "
                        f"({', '.join(SEQUENCE_MODELS)}), not to {config.model!r}")
    unknown = sorted(set(config.model_options) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown --model-option {unknown[0]!r}; choose from: "
                        f"{', '.join(DEFAULTS)}")
    if config.folds is not None and config.folds < 2:
        raise UserError(f"--folds must be at least 2, got {config.folds}")
    if not config.modalities:
        raise UserError("--modalities needs at least one of: audio, visual, text")
    for name, choices in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                          ("decode_device", ("cpu", "cuda")), ("device", ("auto", "cpu", "cuda")),
                          ("modulate", ("conv", "encoder")),
                          ("olm_initial", ("mean", "last-batch")),
                          ("eval_crop", ("centre", "random")),
                          ("eval_resize", ("crop", "square")),
                          ("train_crop", ("clip", "frame")),
                          ("olm_reduction", ("sum", "mean")),
                          ("olm_heldout", ("train", "eval")),
                          ("sampling", ("exact", "resample")),
                          ("epoch_steps", ("train", "shorter")),
                          ("mla_projection", ("none", "owm", "owm-add")),
                          ("mla_gate", ("entropy", "batch-entropy", "fixed")),
                          ("mla_stale_grads", ("zero", "none")),
                          ("init", INITS),
                          ("relearning_kmeans", ("torch", "sklearn"))):
        if getattr(config, name) not in choices:
            raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                            f"got {getattr(config, name)!r}")
    positive = ("epochs", "batch_size", "image_size", "log_every", "shuffle_buffer")
    for name in positive:
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("eval_batch_size", "steps_per_epoch", "frames", "crop_columns",
                 "global_batch_size", "lr_step", "probe_every", "pmr_proto_batches"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if config.epoch_steps == "shorter" and not method.needs_heldout:
        raise UserError(f"--epoch-steps shorter is the shorter of the train and held-out "
                        f"passes; --method {config.method} reads no held-out stream")
    if config.lr <= 0:
        raise UserError("--lr must be positive")
    if config.workers < 0:
        raise UserError("--workers must be 0 or more")
    for name in ("olm_lr", "olm_weight_decay"):
        value = getattr(config, name)
        if value is not None and not value >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")


def require_run_paths(config: TrainConfig) -> None:
    """A run needs shards to read and a folder to write; say which is missing, as click would
    for a required option (they are optional flags because --config or --resume can give them)."""
    for name, what in (("shards", "the shard folder to train on"),
                       ("run_dir", "the folder for this run's checkpoints and logs")):
        if not getattr(config, name):
            raise UserError(f"Missing option '--{name.replace('_', '-')}' ({what}; or give it in "
                            "--config)")
    check_output_dir(config.run_dir)  # made later, with its missing parents


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def resolve_alpha(config: TrainConfig, dataset: str | None,
                  method_default: float | None = None) -> float:
    """α given by the user, else the method's own default (PMR: 1.0), else the dataset's
    recommended `ogm_ge_alpha` (an OGM-GE value), else 0.8."""
    if config.alpha is not None:
        return float(config.alpha)
    if method_default is not None:
        return float(method_default)
    if dataset:
        try:
            from avprep.datasets import dataset_defaults

            value = dataset_defaults(dataset).get("ogm_ge_alpha")
            if value is not None:
                return float(value)
        except (ImportError, UserError):
            pass
    return 0.8


def selection_protocol(config: TrainConfig) -> str:
    """How the run chooses its best epoch: "legacy" (on test, as the released OGM-GE code),
    "folds" (each fold's own val) or "val"."""
    if config.folds:
        return "folds"
    return "legacy" if config.val_split == config.test_split else "val"
