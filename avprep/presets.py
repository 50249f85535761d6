"""Named presets: what goes into a shard (audio recipe, frame policy, clip policy).

A preset is data: its `to_dict()` is recorded verbatim in `index.json`, and
`Preset.from_dict` rebuilds it, so a shard set describes itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import audio as audio_lib
from .errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    sample_rate: int
    clip_seconds: float | None  # None: keep the whole clip/segment
    fit: str  # how a short clip is lengthened: "tile" or "pad"
    spectrogram: dict  # {"recipe": name in audio.RECIPES, **parameters}
    clip_amplitude: bool = False  # clip the waveform to [-1, 1] first (CREMA-D recipe)
    columns: int | None = None  # pad/trim the spectrogram's time axis to this many columns
    fps: float = 1.0
    frame_size: int = 256  # short side in pixels; 0 keeps the original size
    jpeg_quality: int = 90
    faces: bool = False  # store face crops instead of whole frames (MER-MULTI)
    face_size: int = 112
    train_frames: int = 1  # frames the trainer samples per clip by default
    train_crop_columns: int | None = None  # random crop of the time axis in training
    description: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preset:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)

    def prepare_waveform(self, wave: np.ndarray) -> np.ndarray:
        """The waveform the spectrogram is computed on: clipped, fitted to `clip_seconds`."""
        wave = np.asarray(wave, dtype=np.float32)
        if self.clip_seconds is not None:
            wave = audio_lib.fit_length(wave, int(round(self.clip_seconds * self.sample_rate)),
                                        self.fit)
        if self.clip_amplitude:
            wave = np.clip(wave, -1.0, 1.0)
        return wave

    def spectrogram_of(self, wave: np.ndarray) -> np.ndarray:
        """float32 [freq, time] spectrogram of a mono waveform at `sample_rate`."""
        params = dict(self.spectrogram)
        recipe = params.pop("recipe")
        if recipe == "log_mel":
            params["sr"] = self.sample_rate
        spec = audio_lib.RECIPES[recipe](self.prepare_waveform(wave), **params)
        if self.columns is not None:
            spec = audio_lib.fit_columns(spec, self.columns)
        return spec.astype(np.float32)

    def silent_spectrogram(self, seconds: float | None = None) -> np.ndarray:
        """Spectrogram of silence, for clips kept with `--missing-audio silence`."""
        n = int(round((self.clip_seconds or seconds or 1.0) * self.sample_rate))
        return self.spectrogram_of(np.zeros(n, np.float32))


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


register(Preset(
    name="cremad", sample_rate=22050, clip_seconds=3.0, fit="tile", clip_amplitude=True,
    spectrogram={"recipe": "stft_log", "n_fft": 512, "hop": 353}, fps=1.0, frame_size=256,
    train_frames=1,
    description="OGM-GE/OLM CREMA-D: 3 s at 22,050 Hz (tiled), log|STFT| 512/353 -> 257x188; 1 fps",
))
register(Preset(
    name="vggsound", sample_rate=16000, clip_seconds=10.0, fit="pad",
    spectrogram={"recipe": "stft_log", "n_fft": 256, "hop": 128}, fps=1.0, frame_size=256,
    train_frames=3, train_crop_columns=626,
    description="OGM-GE VGGSound: 10 s at 16 kHz, log|STFT| 256/128 -> 129x1251; "
                "trainer crops 5 s (626 columns); 1 fps, 3 frames",
))
register(Preset(
    name="ks", sample_rate=16000, clip_seconds=10.0, fit="pad",
    spectrogram={"recipe": "log_mel", "n_mels": 128, "win_ms": 25.0, "hop_ms": 10.0,
                 "n_fft": 1024},
    columns=1024, fps=1.0, frame_size=256, train_frames=3,
    description="Kinetics-Sounds: 10 s at 16 kHz, 128-bin log-mel 25/10 ms -> 128x1024; 1 fps",
))
register(Preset(
    name="ave", sample_rate=22050, clip_seconds=3.0, fit="tile", clip_amplitude=True,
    spectrogram={"recipe": "stft_log", "n_fft": 512, "hop": 353}, fps=1.0, frame_size=256,
    train_frames=3,
    description="OLM AVE: the CREMA-D recipe over the annotated event segment; 1 fps",
))
register(Preset(
    name="mer", sample_rate=16000, clip_seconds=8.0, fit="pad",
    spectrogram={"recipe": "log_mel", "n_mels": 128, "win_ms": 25.0, "hop_ms": 10.0,
                 "n_fft": 1024},
    columns=800, fps=2.0, frame_size=256, faces=True, face_size=112, train_frames=8,
    description="MER-MULTI: 8 s at 16 kHz, 128-bin log-mel -> 128x800; 112x112 face crops at 2 fps",
))
register(Preset(
    name="synth", sample_rate=8000, clip_seconds=2.0, fit="pad",
    spectrogram={"recipe": "stft_log", "n_fft": 256, "hop": 128}, fps=2.0, frame_size=64,
    train_frames=2,
    description="synthetic demo/test data: 2 s at 8 kHz, log|STFT| 256/128 -> 129x126; "
                "2 fps, 64 px",
))


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}"
        ) from None
