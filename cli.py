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


# --- avprep: shards (build-shards, inspect, verify) ---------------------------------------


# --- avtrain: training (fit, eval) ---------------------------------------------------------


# --- avtrain: reports (report) -------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    avprep()
