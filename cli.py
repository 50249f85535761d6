"""Command line: `avprep` (prepare data) and `avtrain` (train, evaluate, report).

Commands stay thin: parse options, call a library function, print a summary. User mistakes
raise `avprep.errors.UserError` and are shown as one line with exit code 2.
"""

from __future__ import annotations

import sys

import click

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
@click.option("--classes", default=6, show_default=True, help="Number of classes.")
@click.option("--per-class", default=50, show_default=True, help="Clips per class.")
@click.option("--seconds", default=2.0, show_default=True, help="Length of each clip.")
@click.option("--size", default=64, show_default=True, help="Frame width and height (even).")
@click.option("--audio-snr", default=None, type=float,
              help="Audio cue to noise ratio in dB (higher = easier).  [default: 6]")
@click.option("--visual-snr", default=None, type=float,
              help="Visual cue to noise ratio in dB (higher = easier).  [default: -2]")
@click.option("--audio-reliability", default=None, type=float,
              help="Fraction of clips whose audio cue names the true class.  [default: 0.8]")
@click.option("--visual-reliability", default=None, type=float,
              help="Fraction of clips whose visual cue names the true class.  [default: 0.8]")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=0, help="Parallel encoders (0 = all cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing synth dataset in OUT.")
def synth(out, overwrite, workers, **options):
    """Write a deliberately imbalanced synthetic AV dataset (real H.264/AAC mp4s + manifest)."""
    from avprep.synth import SynthConfig, write_synth

    config = SynthConfig(**{k: v for k, v in options.items() if v is not None})
    summary = write_synth(out, config, workers=workers, overwrite=overwrite, progress=True)
    click.echo(summary.describe())


# --- avprep: datasets (manifest, extract-frames, extract-audio) ---------------------------


def _dataset_options(f):
    """Options shared by every command that reads a dataset root."""
    options = [
        click.option("--split-file", multiple=True, type=click.Path(dir_okay=False),
                     help="List file(s) fixing each clip's split, e.g. OGM-GE's train.csv and "
                          "test.csv (split from a column or the file name). Repeatable."),
        click.option("--val-fraction", default=0.1, show_default=True,
                     help="Share of train groups carved out as val when there is no val."),
        click.option("--test-fraction", default=0.1, show_default=True,
                     help="Test share of a hash split (datasets without an official test)."),
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
    for option in reversed(options):
        f = option(f)
    return f


def _options_dict(kw: dict) -> dict:
    return {"split_file": kw.pop("split_file"), "val_fraction": kw.pop("val_fraction"),
            "test_fraction": kw.pop("test_fraction"), "classes_file": kw.pop("classes_file"),
            "frames_dir": kw.pop("frames_dir"), "audio_dir": kw.pop("audio_dir"),
            "csv": kw.pop("csv_path"), "trust_pickle": kw.pop("trust_pickle")}


@avprep.command()
@click.argument("dataset")
@click.argument("root", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Manifest to write (JSONL).")
@click.option("--missing-file", type=click.Path(dir_okay=False),
              help="Where to list clips that are listed but missing  [default: OUTPUT.missing.txt]")
@_dataset_options
def manifest(dataset, root, output, missing_file, **kw):
    """Read a dataset ROOT (cremad, ave, vggsound, kinetics_sounds, mer, folder, synth) and
    write its manifest, with a summary of clips per split and class."""
    import os

    from avprep.datasets import scan_dataset
    from avprep.manifest import write_manifest

    scan = scan_dataset(dataset, root, **_options_dict(kw))
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise UserError(f"folder {out_dir} for the manifest does not exist")
    write_manifest(scan.records, output, classes=scan.classes, dataset=scan.dataset)
    click.echo(scan.describe())
    click.echo(f"manifest: {output} ({len(scan.records)} records)")
    missing_file = missing_file or f"{output}.missing.txt"
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


def _records_for_extract(source, dataset, split, kw):
    from avprep.frames import records_from

    return records_from(source, dataset=dataset, splits=split or None, **_options_dict(kw))


@avprep.command("extract-frames")
@click.argument("source", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--dataset", help="Read SOURCE as this dataset's root (else a manifest).")
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
@_dataset_options
def extract_frames_cmd(source, out, dataset, split, fps, size, fmt, quality, faces, face_size,
                       workers, overwrite, **kw):
    """Extract frames (seed-compatible JPEG folders or HDF5); resumable and parallel."""
    from avprep.frames import extract_frames

    m = _records_for_extract(source, dataset, split, kw)
    summary = extract_frames(m.records, out, fps=fps, size=size, fmt=fmt, quality=quality,
                             faces=faces, face_size=face_size, workers=workers,
                             progress=True, overwrite=overwrite)
    click.echo(summary.describe())


@avprep.command("extract-audio")
@click.argument("source", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--dataset", help="Read SOURCE as this dataset's root (else a manifest).")
@click.option("--split", multiple=True, help="Only these splits (repeatable).")
@click.option("--sr", default=16000, show_default=True, help="Sample rate of the mono WAVs.")
@click.option("--workers", default=0, help="Parallel clips (0 = all cores).")
@click.option("--overwrite", is_flag=True, help="Redo clips that are already done.")
@_dataset_options
def extract_audio_cmd(source, out, dataset, split, sr, workers, overwrite, **kw):
    """Extract mono WAVs (OUT/{key}.wav); resumable and parallel."""
    from avprep.frames import extract_audio

    m = _records_for_extract(source, dataset, split, kw)
    summary = extract_audio(m.records, out, sample_rate=sr, workers=workers, progress=True,
                            overwrite=overwrite)
    click.echo(summary.describe())


# --- avprep: shards (build-shards, inspect, verify) ---------------------------------------


# --- avtrain: training (fit, eval) ---------------------------------------------------------


# --- avtrain: reports (report) -------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    avprep()
