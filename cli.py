"""Command line: `avprep` (prepare data) and `avtrain` (train, evaluate, report).

Commands stay thin: parse options, call a library function, print a summary. User mistakes
raise `avprep.errors.UserError` and are shown as one line with exit code 2.
"""

from __future__ import annotations

import sys

import click
import cloup

from avprep import __version__
from avprep.errors import MediaError, UserError


class FriendlyGroup(click.Group):
    """A click group that turns user errors into one line and a non-zero exit, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, MediaError) as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


@click.group(cls=FriendlyGroup)
@click.version_option(__version__, prog_name="avprep")
def avprep():
    """Prepare audio-visual datasets: raw videos -> manifest -> WebDataset shards."""


@click.group(cls=FriendlyGroup)
@click.version_option(__version__, prog_name="avtrain")
def avtrain():
    """Train and evaluate audio-visual classifiers with modality balancing."""


# --- avprep: foundation (doctor, synth) ---------------------------------------------------


@avprep.command()
def doctor():
    """Show which ffmpeg, torch and CUDA this machine has: the first thing to run when stuck."""
    from avprep.doctor import collect

    for name, value in collect().items():
        click.echo(f"{name:>16}: {value}")


@avprep.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--regime", type=click.Choice(["default", "imbalanced"]), default="default",
              show_default=True,
              help="A named set of the values below; flags given override it. imbalanced: "
              "the calibrated bench regime (recipe synth-imbalanced; docs/bench.md).")
@click.option("--classes", type=int, help="Number of classes.  [default: 6]")
@click.option("--per-class", type=int, help="Clips per class.  [default: 50; imbalanced: 150]")
@click.option("--seconds", type=float, help="Length of each clip.  [default: 2]")
@click.option("--size", type=int,
              help="Frame width and height (even).  [default: 64; imbalanced: 32]")
@click.option("--audio-snr", type=float,
              help="Audio cue to noise ratio in dB (higher = easier).  [default: 6; imbalanced: "
              "20]")
@click.option("--visual-snr", type=float,
              help="Visual cue to noise ratio in dB (higher = easier).  [default: 2; imbalanced: "
              "3]")
@click.option("--audio-reliability", type=float,
              help="Fraction of clips whose audio cue names the true class.  [default: 0.8; "
              "imbalanced: 0.95]")
@click.option("--visual-reliability", type=float,
              help="Fraction of clips whose visual cue names the true class.  [default: 0.8; "
              "imbalanced: 0.9]")
@click.option("--val-fraction", type=float,
              help="Share of clips in val (hashed by key).  [default: 0.15; imbalanced: 0.2]")
@click.option("--test-fraction", type=float,
              help="Share of clips in test.  [default: 0.15; imbalanced: 0.4]")
@click.option("--seed", type=int, help="Seed of the clips and the split.  [default: 0]")
@click.option("--workers", default=0, help="Parallel encoders (0 = all cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing synth dataset in OUT.")
def synth(out, regime, overwrite, workers, **options):
    """Write a deliberately imbalanced synthetic AV dataset (real H.264/AAC mp4s + manifest)."""
    from avprep.synth import regime_config, write_synth

    config = regime_config(regime, **{k: v for k, v in options.items() if v is not None})
    summary = write_synth(out, config, workers=workers, overwrite=overwrite, progress=True,
                          regime=regime)
    click.echo(summary.describe())


# --- avprep: datasets (manifest, extract-frames, extract-audio) ---------------------------


def _source_options(manifest: bool = True):
    """How every command names what it reads: `--dataset NAME --root DIR` (with the dataset
    options below) or, where a manifest makes sense, `--manifest FILE`."""
    options = [
        click.option("--dataset", help="Dataset adapter: cremad, ave, vggsound, "
                     "kinetics_sounds, mer, folder, synth (with --root)."),
        click.option("--root", type=click.Path(file_okay=False),
                     help="The dataset's root folder (with --dataset)."),
    ]
    if manifest:
        options.append(click.option("--manifest", type=click.Path(dir_okay=False),
                                    help="A manifest.jsonl instead of --dataset/--root."))
    options += [
        click.option("--split-file", multiple=True, type=click.Path(dir_okay=False),
                     help="List file(s) fixing each clip's split, e.g. OGM-GE's train.csv and "
                          "test.csv (split from a column or the file name). Repeatable."),
        click.option("--val-fraction", type=float,
                     help="Share of train groups carved out as val when there is no val; 0 "
                          "carves none.  [default: 0.1]"),
        click.option("--test-fraction", type=float,
                     help="Test share of a hash split (datasets without an official test).  "
                          "[default: 0.1]"),
        click.option("--classes-file", type=click.Path(dir_okay=False),
                     help="Pin the class list (one per line)."),
        click.option("--frames-dir", type=click.Path(file_okay=False),
                     help="Reuse seed-extracted frames: FRAMES_DIR/{clip}/*.jpg."),
        click.option("--audio-dir", type=click.Path(file_okay=False),
                     help="Reuse seed-extracted audio: AUDIO_DIR/{clip}.wav."),
        click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
                     help="VGGSound: the label CSV when it is not ROOT/vggsound.csv."),
        click.option("--trust-pickle", is_flag=True,
                     help="MER: read the official pickled label-6way.npz."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


DATASET_OPTIONS = ("split_file", "val_fraction", "test_fraction", "classes_file", "frames_dir",
                   "audio_dir", "csv_path", "trust_pickle")


def _source(kw: dict) -> dict:
    """Pop the source options out of a command's keyword arguments: read_source's arguments."""
    out = {name: kw.pop(name, None) for name in ("manifest", "dataset", "root")}
    for name in DATASET_OPTIONS:
        value = kw.pop(name)
        out["csv" if name == "csv_path" else name] = value
    return out


def _deprecated(old: str, new: str) -> None:
    click.echo(f"Warning: `{old}` is deprecated; use `{new}`.", err=True)


@avprep.command()
@click.argument("legacy", nargs=-1, metavar="")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Manifest to write (JSONL).")
@click.option("--missing-file", type=click.Path(dir_okay=False),
              help="Where to list clips that are listed but missing  [default: OUTPUT.missing.txt]")
@_source_options(manifest=False)
def manifest(legacy, output, missing_file, **kw):
    """Read a dataset (--dataset NAME --root DIR: cremad, ave, vggsound, kinetics_sounds, mer,
    folder, synth) and write its manifest, with a summary of clips per split and class."""
    import os

    from avprep.datasets import scan_dataset
    from avprep.manifest import write_manifest
    from avprep.outputs import make_output_dir
    from avprep.sources import given_options

    source = _source(kw)
    if legacy:  # the old spelling: avprep manifest DATASET ROOT
        if len(legacy) != 2 or source["dataset"] or source["root"]:
            raise UserError("unexpected arguments " + " ".join(legacy) + "; name the dataset "
                            "with --dataset NAME --root DIR")
        source["dataset"], source["root"] = legacy
        _deprecated("avprep manifest DATASET ROOT", "avprep manifest --dataset DATASET --root ROOT")
    dataset, root = source.pop("dataset"), source.pop("root")
    if not dataset or not root:
        raise UserError("say which dataset to read: --dataset NAME --root DIR")
    scan = scan_dataset(dataset, root, **given_options(source))
    missing_file = missing_file or f"{output}.missing.txt"
    for path in (output, missing_file):  # their folders, with missing parents
        make_output_dir(os.path.dirname(os.path.abspath(path)))
    write_manifest(scan.records, output, classes=scan.classes, dataset=scan.dataset)
    click.echo(scan.describe())
    click.echo(f"manifest: {output} ({len(scan.records)} records)")
    for stale in (missing_file, f"{output}.unlisted.txt"):  # from an earlier run
        if os.path.exists(stale):
            os.remove(stale)
    if scan.missing:
        with open(missing_file, "w", encoding="utf-8") as fh:
            for r in scan.missing:
                fh.write(f"{r.extra.get('clip', r.key)}\t{r.split}\t{r.label}\n")
        click.echo(f"missing clips listed in {missing_file}")
    if scan.unlisted:
        unlisted_file = f"{output}.unlisted.txt"
        with open(unlisted_file, "w", encoding="utf-8") as fh:
            fh.writelines(f"{p}\n" for p in scan.unlisted)
        click.echo(f"files not in any list: {unlisted_file}")


def _records_for_extract(command: str, legacy_source, split, kw):
    """Records for extract-frames/extract-audio, from --dataset/--root or --manifest (or the
    deprecated positional SOURCE), restricted to `split`."""
    from avprep.sources import legacy_source as from_legacy
    from avprep.sources import read_source

    source = _source(kw)
    if legacy_source:
        if source["manifest"] or source["root"]:
            raise UserError(f"give the source once: --manifest or --dataset/--root, not also "
                            f"{legacy_source}")
        source["manifest"], source["root"] = from_legacy(legacy_source, source["dataset"])
        new = (f"--manifest {source['manifest']}" if source["manifest"]
               else f"--dataset {source['dataset']} --root {source['root']}")
        _deprecated(f"avprep {command} SOURCE", f"avprep {command} {new}")
    loaded = read_source(**source)
    if split:
        loaded.records = [r for r in loaded.records if r.split in set(split)]
        if not loaded.records:
            raise UserError(f"no clips in split(s) {', '.join(sorted(set(split)))}")
    return loaded


@avprep.command("extract-frames")
@click.argument("legacy_source", required=False, metavar="", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--split", multiple=True, help="Only these splits (repeatable).")
@click.option("--fps", default=1.0, show_default=True,
              help="Frames per second; frame i is the one on screen at t = i/fps.")
@click.option("--size", default=256, show_default=True, help="Short side in pixels (0: keep).")
@click.option("--format", "fmt", type=click.Choice(["jpg", "h5"]), default="jpg",
              show_default=True, help="OUT/{key}/{i:05d}.jpg, or one OUT/{split}.h5 per split.")
@click.option("--quality", default=90, show_default=True, help="JPEG quality.")
@click.option("--faces", is_flag=True, help="Store the largest face (MER-MULTI) instead.")
@click.option("--face-size", default=112, show_default=True)
@click.option("--workers", default=0, help="Parallel clips (0 = all cores).")
@click.option("--overwrite", is_flag=True, help="Redo clips that are already done.")
@_source_options()
def extract_frames_cmd(legacy_source, out, split, fps, size, fmt, quality, faces, face_size,
                       workers, overwrite, **kw):
    """Extract frames (seed-compatible JPEG folders or HDF5) of --dataset/--root or
    --manifest; resumable and parallel."""
    from avprep.frames import extract_frames

    m = _records_for_extract("extract-frames", legacy_source, split, kw)
    summary = extract_frames(m.records, out, fps=fps, size=size, fmt=fmt, quality=quality,
                             faces=faces, face_size=face_size, workers=workers,
                             progress=True, overwrite=overwrite)
    click.echo(summary.describe())


@avprep.command("extract-audio")
@click.argument("legacy_source", required=False, metavar="", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--split", multiple=True, help="Only these splits (repeatable).")
@click.option("--sr", default=16000, show_default=True, help="Sample rate of the mono WAVs.")
@click.option("--workers", default=0, help="Parallel clips (0 = all cores).")
@click.option("--overwrite", is_flag=True, help="Redo clips that are already done.")
@_source_options()
def extract_audio_cmd(legacy_source, out, split, sr, workers, overwrite, **kw):
    """Extract mono WAVs (OUT/{key}.wav) of --dataset/--root or --manifest; resumable and
    parallel."""
    from avprep.frames import extract_audio

    m = _records_for_extract("extract-audio", legacy_source, split, kw)
    summary = extract_audio(m.records, out, sample_rate=sr, workers=workers, progress=True,
                            overwrite=overwrite)
    click.echo(summary.describe())


# --- avprep: shards (build-shards, inspect, verify) ---------------------------------------


@avprep.command("build-shards")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder for the shards, or s3://BUCKET/PREFIX or gs://BUCKET/PREFIX "
              "(each shard uploaded when complete, index.json last).")
@click.option("--preset", help="Preset name (default: the dataset's).")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
@click.option("--max-shard-bytes", help="Also cut a shard's tar into parts past this size, "
              "e.g. 500M or 2G (parts are named NAME-001.tar, ...).")
@click.option("--workers", default=0, help="Parallel shard writers (0 = all cores).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True)
@click.option("--ray-address", help="Ray cluster address (default: start a local Ray).")
@click.option("--splits", help="Comma-separated splits to convert (default: all).")
@click.option("--limit", type=int, help="At most this many clips per split (a quick subset).")
@click.option("--frame-size", type=int, help="Short side of stored frames (0 keeps the original).")
@click.option("--missing-audio", type=click.Choice(["drop", "silence"]), default="drop",
              show_default=True, help="A clip without audio: drop it, or keep a silent spectrogram.")
@click.option("--seed", default=0, show_default=True, help="Seed of the shard assignment.")
@click.option("--overwrite", is_flag=True, help="Rebuild OUT even if it was built differently.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_source_options()
def build_shards_cmd(out, preset, shard_size, max_shard_bytes, workers, executor, ray_address,
                     splits, limit, frame_size, missing_audio, seed, overwrite, no_progress,
                     **kw):
    """Convert the clips of --dataset/--root or --manifest to WebDataset shards (resumable:
    rerun the same command to finish)."""
    from avprep.shards import build_shards, load_source, parse_size
    from avprep.sources import split_file_args

    source = _source(kw)
    loaded, chosen = load_source(preset=preset, **source)
    if frame_size is not None:
        chosen = chosen.replace(frame_size=frame_size)
    summary = build_shards(
        loaded.records, out, chosen, classes=loaded.classes, dataset=loaded.dataset,
        shard_size=shard_size, workers=workers, executor=executor, ray_address=ray_address,
        splits=splits.split(",") if splits else None, limit=limit,
        missing_audio=missing_audio, overwrite=overwrite, seed=seed, progress=not no_progress,
        max_shard_bytes=parse_size(max_shard_bytes) if max_shard_bytes else None,
        extra_args=split_file_args(source["split_file"]))
    click.echo(summary.describe())


@avprep.command("inspect")
@click.argument("out", type=click.Path())
@click.option("--show", "key", help="Write a PNG of this sample (spectrogram + frames).")
@click.option("--png", type=click.Path(dir_okay=False), help="Where to write it [KEY.png].")
def inspect_cmd(out, key, png):
    """Summarise a shard set: splits, samples, class histogram, preset, failures."""
    from avprep.inspection import show_sample, summary

    click.echo(summary(out))
    if key:
        click.echo(f"wrote {show_sample(out, key, png or f'{key}.png')}")


@avprep.command("verify")
@click.argument("out", type=click.Path())
def verify_cmd(out):
    """Decode every member of every shard and check counts and keys against index.json."""
    from avprep.inspection import verify

    problems = verify(out)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise UserError(f"{out}: {len(problems)} problem(s) found")
    click.echo(f"{out}: every shard decodes and matches index.json")


# --- avprep: features (import-features) ---


@avprep.command("import-features")
@click.option("--feature", "features", multiple=True, required=True, metavar="MODALITY=DIR",
              help="A folder of {clip}.npy arrays [time, dim]; repeat per modality.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder for the shards.")
@click.option("--keep-missing", is_flag=True,
              help="Keep clips lacking a modality, with that modality masked (default: drop).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage type of the features.")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
@click.option("--workers", default=0, help="Parallel shard writers (0 = all cores).")
@click.option("--seed", default=0, show_default=True, help="Seed of the shard assignment.")
@click.option("--overwrite", is_flag=True, help="Rebuild OUT even if it was built differently.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_source_options()
def import_features_cmd(features, out, keep_missing, dtype, shard_size, workers, seed,
                        overwrite, no_progress, **kw):
    """Pack precomputed per-clip feature sequences into shards ({key}.{modality}.npy); labels
    and splits come from --manifest (which may list no media paths) or --dataset/--root."""
    from avprep.features import import_features, parse_feature_args
    from avprep.sources import read_source

    loaded = read_source(require_media=False, **_source(kw))
    summary = import_features(
        loaded.records, parse_feature_args(features), out, classes=loaded.classes,
        dataset=loaded.dataset, keep_missing=keep_missing, dtype=dtype, shard_size=shard_size,
        workers=workers, seed=seed, overwrite=overwrite, progress=not no_progress)
    click.echo(summary.describe())


# --- avtrain: training (fit, eval) ---------------------------------------------------------


def _cache_options() -> list:
    """--cache-dir/--cache-size for commands that read remote shards (fit, eval, bench)."""
    return [
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Remote shards: keep the tars read in this local folder (filled while "
                     "they stream; later epochs read it) [default: no cache]"),
        click.option("--cache-size", help="Bound of --cache-dir, e.g. 500M or 20G; least "
                     "recently used tars are evicted [default: 10G]"),
    ]


def shard_cache_options(f):
    """Decorator form of the cache flags, for any command that reads shards."""
    for opt in reversed(_cache_options()):
        f = opt(f)
    return f


def _fit_option_groups() -> list:
    """`avtrain fit` flags by what they are for, one per TrainConfig field (unset flags leave
    the config alone); each method's own options follow under their own headings, generated
    from the methods' declarations (MethodOptionsCommand)."""
    return [
        ("Run", [
            click.option("--recipe", help="A paper's protocol by name (see `avtrain recipes`); "
                         "--config and flags override its settings."),
            click.option("--config", "config_file", type=click.Path(dir_okay=False),
                         help="YAML file of settings (same names as the flags); flags override it."),
            click.option("--print-config", is_flag=True, help="Print the merged settings and exit."),
            click.option("--resume", type=click.Path(),
                         help="Continue the run in this directory from its last.pt."),
            click.option("--overwrite", is_flag=True,
                         help="Start afresh in a --run-dir that already holds a run (its metrics "
                         "and checkpoints are removed)."),
            click.option("--run-dir", type=click.Path(file_okay=False), help="Output run folder."),
            click.option("--seed", type=int, help="[default: 0]"),
            click.option("--folds", type=int, help="k-fold cross-validation over train+val: k runs "
                         "in RUN/fold*, mean ± std in RUN/cv.md (rerun to resume)"),
        ]),
        ("Data", [
            click.option("--shards", type=click.Path(), help="Shard folder (with index.json), or "
                         "an s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or https://HOST/PATH URL."),
            *_cache_options(),
            click.option("--modalities", help="Comma list, e.g. audio or audio,visual "
                         "[default: audio,visual]"),
            click.option("--frames", type=int, help="Frames per clip [default: the preset's]"),
            click.option("--image-size", type=int, help="Frame crop size [default: 224]"),
            click.option("--crop-columns", type=int,
                         help="Spectrogram crop in train [default: the preset's]"),
            click.option("--eval-crop", help="Spectrogram window in eval/test: centre, or random "
                         "(the released VGGSound test loader; seeded by --seed and the sample key) "
                         "[default: centre]"),
            click.option("--eval-resize", help="Frames in eval/test: crop (short side, centre "
                         "crop) or square (Resize((224, 224)) as the released code) "
                         "[default: crop]"),
            click.option("--train-crop", help="Training RandomResizedCrop+flip: clip (one per clip) "
                         "or frame (one per frame, as the released code) [default: clip]"),
            click.option("--workers", type=int, help="Loader processes per rank [default: 2]"),
            click.option("--sampling", help="exact (every training sample once per epoch, in an "
                         "order set by --seed and the epoch, as DataLoader(shuffle=True)) or resample "
                         "(shards drawn with replacement + a shuffle buffer: web-scale sets) "
                         "[default: exact]"),
            click.option("--shuffle-buffer", type=int, help="--sampling resample [default: 1000]"),
            click.option("--strict/--no-strict", default=None, help="A damaged sample (a member "
                         "the run needs missing, unreadable bytes) stops the run with one line "
                         "instead of being skipped and counted [default: skip]"),
            click.option("--epoch-steps", help="train (one pass over train) or shorter (the "
                         "shorter of the train and held-out passes: OLM-com's released "
                         "zip(train, held-out)) [default: train]"),
            click.option("--decode-device", help="cpu or cuda (JPEGs decoded on the GPU) "
                         "[default: cpu]"),
        ]),
        ("Model", [
            click.option("--model", help="Encoder of every modality: resnet18 (released), tiny, "
                         "timm:NAME, torchvision:NAME; or a sequence transformer: emt, mbt, umt, "
                         "ca [default: resnet18]"),
            click.option("--encoder", "encoders", multiple=True, metavar="MODALITY=NAME",
                         help="One modality's encoder, repeatable: e.g. visual=timm:efficientnet_b0"
                         " (any timm model), audio=torchvision:resnet50 [default: --model]"),
            click.option("--pretrained", multiple=True, metavar="MODALITY=SOURCE",
                         help="Start an encoder from weights, repeatable: a local .pt/.pth state "
                         "dict, .safetensors file or avbalance checkpoint (its MODALITY encoder), "
                         "or timm / torchvision (the library's weights: needs hub access)"),
            click.option("--freeze", multiple=True, metavar="MODALITY",
                         help="Freeze this modality's encoder backbone (no gradient, BatchNorm in "
                         "eval mode), repeatable"),
            click.option("--temporal-pool", help="Frames of a clip: mean (released) or attention "
                         "(learned weights over time) [default: mean]"),
            click.option("--feature-dim", type=int, help="Project every encoder's features to "
                         "this width (fusions shared, boost, attention need one width) "
                         "[default: off]"),
            click.option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE",
                         help="Sequence model option, repeatable: d_model, heads, layers, bottleneck,"
                         " ff, dropout, ... [defaults: 768, 8, 3, 12, 1024, 0.1]"),
            click.option("--fusion", help="sum, concat, film, gated, bilinear, attention, "
                         "bilinear_tanh, mha, boost (ReconBoost's shared head), shared (one head "
                         "for every modality; mla builds it from concat), cosine (MMCosine's normalised "
                         "concat; mmcosine builds it from concat) [default: concat]"),
            click.option("--init", help="Weight init after building: torch (PyTorch's defaults) or "
                         "ogm_ge (OGM-GE's released weight_init on the whole model: xavier-normal "
                         "Linear with zero bias, kaiming-normal fan_out Conv2d, BatchNorm 1/0) "
                         "[default: torch]"),
        ]),
        ("Optimisation", [
            click.option("--epochs", type=int, help="[default: 30]"),
            click.option("--batch-size", type=int, help="Per process [default: 64]"),
            click.option("--global-batch-size", type=int,
                         help="Across all processes (the papers' batch): sets --batch-size to "
                         "this / processes [default: off]"),
            click.option("--steps-per-epoch", type=int,
                         help="[default: train samples // (batch size x processes)]"),
            click.option("--optimizer", help="sgd, adam or adamw [default: sgd]"),
            click.option("--lr", type=float, help="[default: 1e-3]"),
            click.option("--lr-for", multiple=True, metavar="MODALITY=LR",
                         help="This modality's encoder learns at LR (the rest at --lr), "
                         "repeatable"),
            click.option("--momentum", type=float, help="SGD momentum [default: 0.9]"),
            click.option("--weight-decay", type=float, help="[default: 1e-4]"),
            click.option("--scheduler", help="step, cosine or none [default: step]"),
            click.option("--lr-step", type=int,
                         help="StepLR step in epochs [default: 70 % of --epochs]"),
            click.option("--lr-gamma", type=float, help="StepLR factor [default: 0.1]"),
            click.option("--clip-grad", type=float, help="Max gradient norm [default: off]"),
        ]),
        ("Evaluation and logging", [
            click.option("--eval-batch-size", type=int, help="[default: the batch size]"),
            click.option("--val-split", help="Split that picks the best epoch; `test` is the legacy "
                         "protocol of the released OGM-GE code, labelled so [default: val]"),
            click.option("--log-every", type=int, help="Steps between log records [default: 10]"),
            click.option("--linear-probe/--no-linear-probe", default=None,
                         help="Linear-probe the best checkpoint's encoders at the end."),
            click.option("--shapley/--no-shapley", default=None, help="At the end, each "
                         "modality's Shapley contribution to the best checkpoint's fused accuracy "
                         "on val and test, in summary.json [default: on]"),
            click.option("--probe-every", type=int, help="Also probe each encoder every N epochs "
                         "on a fixed subset (the imbalance over time) [default: off]"),
            click.option("--progress/--no-progress", default=None, help="Progress bars."),
        ]),
        ("Hardware", [
            click.option("--device", help="auto, cpu or cuda [default: auto]"),
            click.option("--amp/--no-amp", default=None, help="bf16 autocast on CUDA [default: on]"),
            click.option("--channels-last/--no-channels-last", default=None,
                         help="NHWC conv weights on CUDA: cuDNN's fast kernels, about 2x the "
                         "samples/s with bf16; rounds differently [default: off]"),
            click.option("--compile/--no-compile", default=None, help="torch.compile the model"),
        ]),
        ("Balancing method", [
            click.option("--method", help="Balancing method: none, ogm, ogm_ge, olm, olm_com, ... "
                         "(`avtrain methods` lists them) [default: none]"),
            click.option("--method-module", metavar="FILE.py|MODULE",
                         help="Load a plug-in method from your own file or module first (its "
                         "options then appear below)."),
            click.option("--method-option", "method_option", multiple=True, metavar="NAME=VALUE",
                         help="One of the chosen method's options by its short name "
                         "(repeatable), e.g. gamma=2.0; the same as its own flag."),
        ]),
    ]


def _method_option_groups() -> list:
    """The methods' own flags, generated from their declared options: the shared window options
    once, then one heading per set of methods that declare the same options (ogm, ogm_ge:
    --modulate). Imports the methods, so it runs only when `fit` is used."""
    from avtrain.balance import all_methods
    from avtrain.options import SHARED

    methods = all_methods()
    shared, owned = {}, {}
    for cls in methods.values():
        for opt in cls.options:
            if opt.shared:
                shared.setdefault(opt.name, []).append((cls.name, opt))
            else:
                key = opt.key(cls.prefix())
                owned.setdefault(key, (opt, cls.prefix(), []))[2].append(cls.name)
    window = []
    for name in SHARED:
        readers = "; ".join(f"{m} {o.describe_default()}" for m, o in shared.get(name, []))
        what = {"alpha": "Strength of the method's modulation, with the method's meaning "
                         "(avtrain methods NAME)",
                "modulation_start": "First modulated epoch (0-based)",
                "modulation_end": "Last modulated epoch (inclusive)"}[name]
        window.append(click.option("--" + name.replace("_", "-"),
                                   type=float if name == "alpha" else int,
                                   help=f"{what}. Read by: {readers}; ignored by the others "
                                   "with a warning."))
    groups = [("Shared window options", window)]
    by_owners: dict[tuple, list] = {}
    for key, (opt, prefix, owners) in owned.items():
        by_owners.setdefault(tuple(owners), []).append(_click_option(opt, prefix, key))
    for owners, opts in by_owners.items():
        plugin = [getattr(methods[m], "origin", None) for m in owners]
        title = f"--method {', '.join(owners)}" + (f" (plug-in: {plugin[0]})" if plugin[0]
                                                    else "")
        groups.append((title, opts))
    return groups


def _click_option(opt, prefix: str, key: str):
    flag = opt.flag_name(prefix)
    default = opt.describe_default()
    released = "" if opt.released_value == opt.default else \
        f"; released: {opt.released_value}"
    text = f"{opt.help[0].upper()}{opt.help[1:]} [default: {default}{released}]"
    if opt.type is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", key, default=None, help=text)
    if opt.type is list:
        return click.option(flag, key, multiple=True, metavar=opt.metavar, help=text)
    kind = click.Choice(list(opt.choices)) if opt.choices else opt.type
    return click.option(flag, key, type=kind, metavar=opt.metavar, help=text)


class MethodOptionsCommand(cloup.Command):
    """`avtrain fit`: its flags grouped under headings (cloup), the methods' own flags generated
    from the registry on first use -- after `--method-module` loaded a plug-in, whose flags then
    parse and show in --help like the built-in ones."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fixed = list(self.params)
        self._made_for: tuple | None = None

    def _make(self, args=()) -> None:
        from avtrain.balance import all_methods, load_method_module

        module = _peek(args, "--method-module")
        if module:
            load_method_module(module)
        names = tuple(all_methods())
        if names == self._made_for:
            return
        params = list(self._fixed)
        for title, opts in _method_option_groups():
            group = cloup.OptionGroup(title)
            for make in opts:
                param = make(lambda: None).__click_params__[0]
                param.group = group
                params.append(param)
        self.params = params
        self.arguments, self.option_groups, self.ungrouped_options = self._group_params(params)
        self._made_for = names

    def parse_args(self, ctx, args):
        self._make(args)
        return super().parse_args(ctx, args)

    def get_params(self, ctx):
        self._make()
        return super().get_params(ctx)


def _peek(args, flag: str) -> str | None:
    """The value of `flag` in raw arguments (--flag V or --flag=V), before click parses them."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _fit_options(f):
    for title, opts in reversed(_fit_option_groups()):
        f = cloup.option_group(title, *opts)(f)
    return f


@avtrain.command(cls=MethodOptionsCommand)
@_fit_options
def fit(config_file, print_config, resume, overwrite, method_option, **flags):
    """Train an audio-visual classifier on a shard folder (also under torchrun for DDP)."""
    from avtrain.config import parse_model_options, to_yaml
    from avtrain.settings import cli_config

    overrides = {k: v for k, v in flags.items() if v is not None and v != ()}
    if method_option:
        overrides["method_options"] = parse_model_options(method_option, "--method-option")
    config = cli_config(overrides, config_file, resume)
    if print_config:
        click.echo(to_yaml(config), nl=False)
        return
    if config.folds:
        from avtrain.folds import cross_validate, markdown

        summary = cross_validate(config, resume=not overwrite)
        if _rank0():
            click.echo(markdown(summary), nl=False)
        return
    from avtrain.loop import fit as run_fit

    summary = run_fit(config, resume=resume, overwrite=overwrite)
    if _rank0():
        test, val = summary.get("test") or {}, summary.get("val") or {}
        click.echo(f"run {summary['run_dir']}: best epoch {summary['best_epoch']} "
                   f"({config.val_split} acc {val.get('acc', float('nan')):.4f}), "
                   f"{summary['steps']} steps, {summary['wall_time']:.1f} s")
        if summary.get("protocol") == "legacy":
            from avtrain.recipes import protocol_label

            click.echo(protocol_label("legacy") + ": the test accuracy below is optimistic")
        if test:
            click.echo(_metrics_table(test, "test")
                       + _shapley_line((summary.get("shapley") or {}).get(config.test_split)))
        if summary.get("linear_probe"):
            click.echo(_probe_table(summary["linear_probe"]))


def _rank0() -> bool:
    """Under torchrun only rank 0 prints."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _metrics_table(m: dict, split: str) -> str:
    cols = ["acc"] + sorted(k for k in m if k.startswith("acc_")) + ["macro_f1", "weighted_f1"]
    head = f"{'split':<8}{'n':>7}" + "".join(f"{c:>12}" for c in cols)
    row = f"{split:<8}{m.get('n', 0):>7}" + "".join(
        f"{m[c]:>12.4f}" if isinstance(m.get(c), float) else f"{'-':>12}" for c in cols)
    return head + "\n" + row + _shapley_line(m.get("shapley"))


def _shapley_line(shapley: dict | None) -> str:
    """"Shapley share of acc: audio 0.31, visual 0.12 (none 0.17)": each modality's exact
    Shapley contribution to the fused accuracy (they sum to acc minus acc with no inputs)."""
    if not shapley:
        return ""
    parts = ", ".join(f"{m} {v:.4f}" for m, v in shapley.items() if m != "subsets")
    return (f"\nShapley share of acc: {parts} (all inputs zeroed: "
            f"{shapley['subsets']['none']:.4f})")


def _probe_table(p: dict) -> str:
    fitted = f"fitted on {p['train_samples']} train samples; " if "train_samples" in p else ""
    lines = [f"linear probe ({fitted}L2 chosen on val; chance {p['chance']:.3f})",
             f"{'features':<10}{'val acc':>10}{'test acc':>10}"]
    for name, r in p.items():
        if isinstance(r, dict):
            lines.append(f"{name:<10}{r['val_acc']:>10.4f}{r['test_acc']:>10.4f}")
    return "\n".join(lines)


@avtrain.command()
@click.argument("name", required=False)
def recipes(name):
    """List the paper protocols (one line each), or show one in full: settings, the data it
    needs, what still differs from the released code, the published numbers."""
    from avtrain.recipes import load_recipe, recipe_names

    if name:
        click.echo(load_recipe(name).describe())
        return
    for recipe_name in recipe_names():
        click.echo(f"{recipe_name:<18} {load_recipe(recipe_name).summary}")


@avtrain.command()
@click.argument("name", required=False)
@click.option("--method-module", metavar="FILE.py|MODULE", help="Load a plug-in method first.")
def methods(name, method_module):
    """List the balancing methods (one line each: paper, year, what it changes, the code it was
    checked against), or show one in full: options with defaults and released values, its
    signal, what differs from its authors' code and BalanceMM's, its recipes."""
    from avtrain.balance import all_methods, load_method_module
    from avtrain.balance.describe import describe, methods_table

    if method_module:
        load_method_module(method_module)
    if name:
        click.echo(describe(name), nl=False)
        return
    click.echo(methods_table(all_methods()))


@avtrain.command("eval")
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint (RUN/best.pt) or RUN.")
@click.option("--shards", type=click.Path(), help="Shard folder or s3://, gs://, https:// URL "
              "[default: the run's].")
@shard_cache_options
@click.option("--split", default="test", show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@click.option("--decode-device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--linear-probe", is_flag=True,
              help="Freeze the encoders, fit a linear classifier per modality on train "
                   "features (L2 chosen on val) and report its accuracy on --split.")
@click.option("--shapley/--no-shapley", default=True, show_default=True,
              help="Each modality's Shapley contribution to the fused accuracy (one more "
                   "evaluation per subset of the modalities, absent inputs zeroed).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_cmd(ckpt, shards, split, batch_size, workers, device, decode_device, linear_probe,
             shapley, as_json, cache_dir, cache_size):
    """Evaluate a checkpoint on one split: acc, acc per modality, macro-F1."""
    import json as json_lib

    from avtrain.checkpoint import load_checkpoint
    from avtrain.evaluate import evaluate_checkpoint, probe_checkpoint

    shards = shards or (load_checkpoint(ckpt).get("config") or {}).get("shards")
    if not shards:
        raise UserError("no shard folder given (--shards) and the checkpoint names none")
    kwargs = dict(batch_size=batch_size, workers=workers, device=device,
                  decode_device=decode_device, cache_dir=cache_dir, cache_size=cache_size)
    if linear_probe:
        result = probe_checkpoint(ckpt, shards, test_split=split, **kwargs)
        text = _probe_table(result)
    else:
        result = evaluate_checkpoint(ckpt, shards, split=split, shapley=shapley, **kwargs)
        text = (f"checkpoint {result['checkpoint']} (epoch {result['epoch']})\n"
                + _metrics_table(result, split))
    if _rank0():
        click.echo(json_lib.dumps(result, indent=2) if as_json else text)


# --- avtrain: benchmarks (bench) -----------------------------------------------------------

BENCH_SETS = ("run_dir", "resume", "print_config", "method", "seed", "folds", "overwrite",
              "method_option")


def _bench_fit_options(f):
    """Every `fit` flag except those the bench sets per run (a flag added to fit is a bench
    flag too)."""
    params = _fit_options(lambda: None).__click_params__
    f.__click_params__ = getattr(f, "__click_params__", []) + [
        p for p in params if p.name not in BENCH_SETS]
    return f


@avtrain.command(cls=MethodOptionsCommand)
@cloup.option_group(
    "Bench",
    click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
                  help="Bench folder: runs/ROW/seedS, results.md, results.csv, figures."),
    click.option("--methods", default="none,ogm_ge,olm", show_default=True,
                  help="Comma list of balancing methods, one row each, or all (every registered method)."),
    click.option("--seeds", help="A count (3 = seeds 0,1,2) or a comma list of seeds (0,4,7) "
                  "[default: 3; 5 with --tune]."),
    click.option("--set", "sets", multiple=True, metavar="METHOD.SETTING=V[,V...]",
                  help="A setting for one method's runs, e.g. ogm_ge.alpha=0.1,0.8 (each value its "
                  "own row); repeatable."),
    click.option("--references/--no-references", default=True, show_default=True,
                  help="Unimodal reference rows (--modalities audio, --modalities visual)."),
    click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
                  show_default=True, help="local: one run after another; ray: one Ray task per run."),
    click.option("--ray-address", help="Ray cluster address, e.g. auto (default: a local Ray)."),
    click.option("--overwrite", is_flag=True,
                  help="Start the bench again, e.g. with other settings (its runs are removed)."),
)
@cloup.option_group(
    "Tuning",
    click.option("--tune", type=int, metavar="N",
                  help="Tune each method on val first: N Optuna trials per method over its "
                  "declared ranges (and --tune-space), then a 'METHOD (tuned)' row."),
    click.option("--tune-epochs", type=int, metavar="E",
                  help="Epochs of each trial [default: --epochs]."),
    click.option("--tune-space", multiple=True, metavar="KEY=LOW..HIGH[:log]|KEY=a,b",
                  help="Also search a setting of every run (lr=0.001..0.1:log) or replace a "
                  "method's range (ogm_ge.alpha=0.1..2); repeatable."),
    click.option("--storage", metavar="URL",
                  help="Optuna RDB storage of the studies (postgresql://..., needed on a Ray "
                  "cluster) [default: sqlite OUT/tune.db]."),
)
@_bench_fit_options
def bench(out_dir, methods, seeds, sets, references, executor, ray_address, overwrite,
          tune, tune_epochs, tune_space, storage, config_file, **flags):
    """Train methods x seeds (and unimodal references) under one protocol; rerun to resume.
    Any fit flag applies to every run, a method's own flag to that method's rows (as --set);
    --tune N tunes each method on val first. Results in OUT/results.md and results.csv."""
    from avtrain.bench import run_bench
    from avtrain.config import load_yaml

    settings = load_yaml(config_file, known_only=False) if config_file else {}
    settings.update({k: v for k, v in flags.items() if v is not None and v != ()})
    result = run_bench(settings.pop("shards", None), out_dir, settings, methods=methods,
                       seeds=seeds, sets=sets, references=references, executor=executor,
                       ray_address=ray_address, overwrite=overwrite, tune=tune,
                       tune_epochs=tune_epochs, tune_space=tune_space, storage=storage,
                       say=click.echo)
    click.echo(f"results: {result['results']} ({len(result['rows'])} rows, "
               f"{len(result['figures'])} figures)")


# --- avtrain: reports (report) -------------------------------------------------------------


@avtrain.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for report.md and the PNG plots [a bench: the bench folder].")
@click.option("--published", "published", metavar="NAME[:DATASET]",
              help="Put one bench beside a shipped published table (balancebenchmark, "
                   "ogm_ge, reconboost): BENCH/published-NAME.md. DATASET: default the "
                   "bench's own.")
def report(runs, out_dir, published):
    """Compare runs: accuracy curves, balancing signal, final table, confusion matrix.
    Given one `avtrain bench` folder: its results table and imbalance figures; with
    --published NAME: ours beside that published table, with the protocol differences."""
    from avtrain.bench import is_bench, write_results
    from avtrain.report import write_report

    if published is not None:
        from avtrain.published import compare

        if len(runs) != 1 or not is_bench(runs[0]):
            raise UserError("--published compares one bench folder (made by avtrain bench), "
                            f"got {', '.join(runs)}")
        result = compare(runs[0], published, out_dir)
        matched = sum(1 for line in result["lines"] if line["row"])
        click.echo(f"published: {result['path']} ({matched} of {len(result['lines'])} "
                   f"published rows matched, dataset {result['dataset']})")
        return
    if len(runs) == 1 and is_bench(runs[0]):
        result = write_results(runs[0], out_dir)
        click.echo(f"results: {result['results']} ({len(result['rows'])} rows, "
                   f"{len(result['figures'])} figures)")
        return
    if not out_dir:
        raise UserError("Missing option '-o' / '--out' (the folder for report.md and plots)")

    result = write_report(list(runs), out_dir)
    for path, why in result["skipped"]:
        click.echo(f"skipped {path}: {why}", err=True)
    click.echo(f"report: {result['report']} ({len(result['figures'])} figures, "
               f"{len(result['rows'])} runs)")


if __name__ == "__main__":  # pragma: no cover
    avprep()
