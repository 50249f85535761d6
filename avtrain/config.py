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
    # encoder of every modality (resnet18 | tiny | timm:NAME | torchvision:NAME); or a sequence
    # model: emt | mbt | umt | ca
    model: str = "resnet18"
    encoders: dict = field(default_factory=dict)  # modality -> encoder name, beside `model`
    temporal_pool: str = "mean"  # frames: mean (released) | attention
    feature_dim: int | None = None  # project every encoder's features to this width
    pretrained: dict = field(default_factory=dict)  # modality -> FILE | timm | torchvision
    freeze: list[str] = field(default_factory=list)  # modalities whose encoder backbone is frozen
    lr_for: dict = field(default_factory=dict)  # modality -> its encoder's learning rate
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
    # NHWC conv weights on CUDA: cuDNN's fast kernels (ResNet-18 ×2 on an H200: 1.6× the
    # samples/s, 2.2× with bf16; benchmarks/RESULTS-gpu.md). Off by default: other kernels round
    # differently, and the audio stem amplifies it (3 steps: 0.145 relative difference in its
    # first conv against 0.003 between two NCHW runs), so runs are not comparable bit for bit.
    channels_last: bool = False
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
    # the shared window options (avtrain.options): each method that reads them declares its own
    # meaning and default (OGM-GE's alpha: the dataset's value; OPM's window starts at 6)
    alpha: float | None = None
    modulation_start: int | None = None
    modulation_end: int | None = None
    # the chosen method's own options, by their short names (avtrain methods NAME lists them);
    # avtrain.settings maps the flat spellings (--mmpareto-gamma, mmpareto_gamma) here
    method_options: dict = field(default_factory=dict)
    # a plug-in method's file or module (--method-module), loaded before the registry is read
    method_module: str | None = None

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


def load_yaml(path: str, *, known_only: bool = True) -> dict:
    """Settings from a YAML file (a mapping of field names). `known_only=False` keeps names
    that are not settings of every run (a method's flat option names, from files written
    before method_options): avtrain.settings maps or refuses them."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    if not known_only:
        return {str(k).replace("-", "_"): v for k, v in data.items()}
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
    if name in ("encoders", "pretrained", "lr_for"):
        return parse_modality_map(value, name)
    if name == "freeze":  # repeated, or comma lists
        value = [value] if isinstance(value, str) else value
        return [v.strip() for item in value for v in str(item).split(",") if v.strip()]
    if name == "method_options":
        if not isinstance(value, dict):
            raise UserError(f"method_options must be a mapping of option names, got {value!r}")
        return {str(k).replace("-", "_"): v for k, v in value.items()}
    kind = _KINDS.get(name)
    try:
        if kind is bool and isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if kind in (int, float):
            return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"setting {name!r}: expected a number, got {value!r}") from None
    return value


def parse_model_options(value, flag: str = "--model-option") -> dict:
    """A mapping, or KEY=VALUE strings (repeated --model-option), values read as YAML."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        value = [value]
    out = {}
    for item in value or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    return out


MAP_FLAGS = {"encoders": "--encoder", "pretrained": "--pretrained", "lr_for": "--lr-for"}


def parse_modality_map(value, name: str) -> dict:
    """A {modality: value} mapping, or MODALITY=VALUE strings (a repeated flag: --encoder,
    --pretrained, --lr-for). Learning rates become floats; names and sources stay strings."""
    flag = MAP_FLAGS[name]
    if isinstance(value, str):
        value = [value]
    items = value.items() if isinstance(value, dict) else []
    if not isinstance(value, dict):
        pairs = []
        for item in value or ():
            key, sep, raw = str(item).partition("=")
            if not sep or not key.strip() or not raw.strip():
                raise UserError(f"{flag} expects MODALITY=VALUE, got {item!r}")
            pairs.append((key.strip(), raw.strip()))
        items = pairs
    out = {}
    for key, raw in items:
        if name == "lr_for":
            try:
                raw = float(raw)
            except (TypeError, ValueError):
                raise UserError(f"{flag} {key}=...: expected a number, got {raw!r}") from None
        out[str(key)] = raw if name == "lr_for" else str(raw)
    return out


def merge(*layers: dict) -> TrainConfig:
    """Layers of settings merged left to right (later wins) over the defaults, not yet checked:
    `avtrain.settings.make_config` merges and checks."""
    merged: dict = {}
    options: dict = {}  # method_options merge option by option, so a flag overrides one
    for layer in layers:
        layer = _normalise_keys(layer or {}, "settings")
        options.update(_coerce("method_options", layer.pop("method_options", None) or {}))
        merged.update(layer)
    merged["method_options"] = options
    return TrainConfig(**{k: _coerce(k, v) for k, v in merged.items()})


def check(config: TrainConfig, method) -> None:
    """Reject settings that cannot work, with one line each (before anything is loaded).
    `method`: the balancer class `config.method` names (avtrain.balance.get_method; its caller
    looks it up, so this module never imports the methods, which read it)."""
    from avtrain.models import ENCODERS, FUSIONS, MODALITIES, SEQUENCE_MODELS
    from avtrain.models.encoders import split_name
    from avtrain.models.init import INITS
    from avtrain.models.sequence import DEFAULTS

    if config.recipe is not None:
        from .recipes import load_recipe

        load_recipe(config.recipe)
    if config.val_split == config.test_split and config.folds:
        raise UserError("--folds chooses each fold's best epoch on its own val; it cannot use "
                        f"--val-split {config.val_split}")
    sequence = config.model in SEQUENCE_MODELS
    if not sequence:
        try:
            split_name(config.model)
        except UserError:
            if str(config.model).startswith(("timm:", "torchvision:")):
                raise  # that library's own line: where to list its names
            raise UserError(f"unknown model {config.model!r}; choose one of: "
                            f"{', '.join(sorted([*ENCODERS, *SEQUENCE_MODELS]))}, timm:NAME or "
                            "torchvision:NAME") from None
    check_encoder_settings(config, sequence)
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
                          ("eval_crop", ("centre", "random")),
                          ("eval_resize", ("crop", "square")),
                          ("train_crop", ("clip", "frame")),
                          ("sampling", ("exact", "resample")),
                          ("epoch_steps", ("train", "shorter")),
                          ("init", INITS)):
        if getattr(config, name) not in choices:
            raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                            f"got {getattr(config, name)!r}")
    positive = ("epochs", "batch_size", "image_size", "log_every", "shuffle_buffer")
    for name in positive:
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("eval_batch_size", "steps_per_epoch", "frames", "crop_columns",
                 "global_batch_size", "lr_step", "probe_every"):
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



def check_encoder_settings(config: TrainConfig, sequence: bool) -> None:
    """--encoder, --pretrained, --freeze, --lr-for name modalities of this run; encoder names
    exist. A pretrained file is read (and refused when missing or not fitting) when the model
    is built, not here: a resumed run never reads it again, so it may have moved."""
    from avtrain.models.encoders import PRETRAINED_LIBRARIES, TEMPORAL_POOLS, split_name

    given = {"--encoder": list(config.encoders), "--pretrained": list(config.pretrained),
             "--freeze": list(config.freeze), "--lr-for": list(config.lr_for)}
    if sequence:
        used = [flag for flag, mods in given.items() if mods]
        used += ["--temporal-pool"] if config.temporal_pool != "mean" else []
        used += ["--feature-dim"] if config.feature_dim else []
        if used:
            raise UserError(f"{used[0]} applies to encoder + fusion models, not to the "
                            f"sequence model {config.model!r}")
        return
    for flag, mods in given.items():
        for m in mods:
            if m not in ("audio", "visual", "text"):
                raise UserError(f"{flag} {m}: unknown modality; choose from: audio, visual, "
                                "text")
            if m not in config.modalities:
                raise UserError(f"{flag} {m}: this run's modalities are "
                                f"{', '.join(config.modalities)} (--modalities)")
    for name in config.encoders.values():
        split_name(name)
    for m, source in config.pretrained.items():
        name = config.encoders.get(m, config.model)
        library = split_name(name)[0]
        if source in PRETRAINED_LIBRARIES and source != library and not (
                name == "resnet18" and source == "torchvision"):
            raise UserError(f"--pretrained {m}={source}: the {m} encoder {name!r} has no "
                            f"{source} weights")
    for m, lr in config.lr_for.items():
        if lr <= 0:
            raise UserError(f"--lr-for {m}={lr}: a learning rate must be positive")
    if config.temporal_pool not in TEMPORAL_POOLS:
        raise UserError(f"--temporal-pool must be one of {', '.join(TEMPORAL_POOLS)}, got "
                        f"{config.temporal_pool!r}")
    if config.feature_dim is not None and config.feature_dim < 1:
        raise UserError("--feature-dim must be at least 1")


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
