"""Named presets: what goes into a shard (audio recipe, frame policy, clip policy).

A preset is data: its `to_dict()` is recorded verbatim in `index.json`, and
`Preset.from_dict` rebuilds it, so a shard set describes itself.

Sources of the released recipes the presets reproduce:
- OGM-GE: Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
  CVPR 2022; code GeWu-Lab/OGM-GE_CVPR2022: dataset/CramedDataset.py (CREMA-D),
  dataset/VGGSoundDataset.py (VGGSound), data/KineticSound/process_audio.py + dataset/dataset.py
  (Kinetics-Sounds).
- OLM: "online logit modulation" (anonymous-gitlab/OLM): datasets/avedataset.py,
  data/AVE/mp4_to_wav.py, data/AVE/video_preprocessing.py (AVE).

The audio front end follows the released path in three fields: `resampler` (librosa 0.8.1's
load(sr=...) is resampy kaiser_best), `mono_mix` (the released scripts' `ffmpeg -acodec
pcm_s16le -ac 1` WAV mixes stereo to (L + R) / 2, 3 dB below ffmpeg's float mix) and the
spectrogram's `pad_mode` (librosa 0.8's stft reflects). An index.json written before these
fields existed reads back as it was built: ffmpeg resampling (soxr HQ where decode_rate was
set), the float mix, zero padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import audio as audio_lib
from .errors import UserError

RESAMPLERS = ("ffmpeg", "kaiser_best", "soxr_hq")
MONO_MIXES = ("float", "s16")


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
    # audio decoded from the file at this rate, then resampled by `resampler` to sample_rate:
    # the released code's 16 kHz WAV read back by librosa at another rate (CREMA-D, OLM AVE)
    decode_rate: int | None = None
    # how audio reaches sample_rate: "ffmpeg" (ffmpeg resamples while decoding; no
    # decode_rate), "kaiser_best" (resampy's kaiser_best from decode_rate, padded to
    # ceil(n * ratio) as librosa 0.8.1's load does) or "soxr_hq" (soxr HQ from decode_rate:
    # what ave-olm shards built before this field used)
    resampler: str = "ffmpeg"
    # stereo -> mono: "float" (ffmpeg's float downmix, (L + R) / sqrt 2) or "s16" (the 16-bit
    # mono WAV `ffmpeg -acodec pcm_s16le -ac 1` writes: (L + R) / 2, rounded to 16 bits)
    mono_mix: str = "float"
    # after the column fit: (x - mean) / (std * std_factor), e.g. OGM-GE's KS fbank
    normalise: dict | None = None
    # what the audio network is fed: "freq_time" [1, F, T] (the stored layout) or "time_freq"
    # [1, T, F] (the trainer transposes; OGM-GE feeds its KS fbank as [1, 1024, 128])
    audio_layout: str = "freq_time"
    # the trainer's frame choice: "random" (train: random, in time order; eval: segment
    # centres) or "segment-start" (train and eval: frames seg*i, seg = n // t, as OGM-GE's
    # dataset/dataset.py for KS)
    frame_pick: str = "random"
    description: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.resampler not in RESAMPLERS:
            raise UserError(f"preset {self.name}: unknown resampler {self.resampler!r} "
                            f"(expected one of {', '.join(RESAMPLERS)})")
        if self.mono_mix not in MONO_MIXES:
            raise UserError(f"preset {self.name}: unknown mono_mix {self.mono_mix!r} "
                            f"(expected one of {', '.join(MONO_MIXES)})")
        resamples = bool(self.decode_rate) and self.decode_rate != self.sample_rate
        if resamples and self.resampler == "ffmpeg":
            raise UserError(f"preset {self.name}: decode_rate {self.decode_rate} needs a "
                            f"resampler to {self.sample_rate} Hz (kaiser_best or soxr_hq)")
        if not resamples and self.resampler != "ffmpeg":
            raise UserError(f"preset {self.name}: resampler {self.resampler} needs a "
                            f"decode_rate other than sample_rate {self.sample_rate}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def build_args(self) -> dict:
        """`to_dict()` without the audio fields at the values builds had before they existed,
        so an interrupted build whose bytes they do not change still resumes."""
        data = self.to_dict()
        for key, before in (("resampler", "ffmpeg"), ("mono_mix", "float")):
            if data[key] == before:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preset:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        if "resampler" not in data and data.get("decode_rate") not in (
                None, data.get("sample_rate")):
            data["resampler"] = "soxr_hq"  # an index.json from before the field: how it was built
        return cls(**data)

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
        if recipe in ("log_mel", "kaldi_fbank"):
            params["sr"] = self.sample_rate
        spec = audio_lib.RECIPES[recipe](self.prepare_waveform(wave), **params)
        if self.columns is not None:
            spec = audio_lib.fit_columns(spec, self.columns)
        if self.normalise:
            n = self.normalise
            spec = (spec - float(n["mean"])) / (float(n["std"]) * float(n.get("std_factor", 1.0)))
        return spec.astype(np.float32)

    def resample_decoded(self, wave: np.ndarray) -> np.ndarray:
        """Audio decoded at `decode_rate or sample_rate` -> `sample_rate` by `resampler`."""
        wave = np.asarray(wave, dtype=np.float32)
        if self.resampler == "ffmpeg" or wave.size == 0:
            return wave
        return audio_lib.resample(wave, self.decode_rate, self.sample_rate, self.resampler)

    def silent_spectrogram(self, seconds: float | None = None) -> np.ndarray:
        """Spectrogram of silence, for clips kept with `--missing-audio silence`."""
        n = int(round((self.clip_seconds or seconds or 1.0) * self.sample_rate))
        return self.spectrogram_of(np.zeros(n, np.float32))


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


# The released CREMA-D / AVE audio front end (OGM-GE CramedDataset.py, OLM cremad_dataset.py and
# avedataset.py): a 16 kHz 16-bit mono WAV read by librosa 0.8.1 at 22,050 Hz (resampy
# kaiser_best), 3 s tiled, clipped, log|STFT 512/353| with librosa's reflect padding; 1 fps.
RELEASED_22K = dict(
    sample_rate=22050, decode_rate=16000, resampler="kaiser_best", mono_mix="s16",
    clip_seconds=3.0, fit="tile", clip_amplitude=True,
    spectrogram={"recipe": "stft_log", "n_fft": 512, "hop": 353, "pad_mode": "reflect"},
    fps=1.0, frame_size=256)


register(Preset(
    name="cremad", **RELEASED_22K, train_frames=1,
    description="OGM-GE/OLM CREMA-D (CramedDataset.py, cremad_dataset.py): the 16 kHz 16-bit "
                "WAV read as librosa 0.8.1's load(sr=22050) does (resampy kaiser_best, padded "
                "to ceil(n x 22050/16000)), 3 s (tiled), clipped to [-1, 1], log(|STFT 512/353| "
                "+ 1e-7) with reflect padding -> 257x188; 1 fps. Checked against the released "
                "code (tests/data/golden): the waveform is bit-identical, the spectrogram within "
                "1e-6 (float64 vs complex64 STFT); shards store float16 (<= 0.008). A WAV not "
                "at 16 kHz is brought to 16 kHz by ffmpeg first (released: resampy from its "
                "own rate)",
))
register(Preset(
    name="vggsound", sample_rate=16000, mono_mix="s16", clip_seconds=10.0, fit="tile",
    clip_amplitude=True,
    spectrogram={"recipe": "stft_log", "n_fft": 256, "hop": 128, "pad_mode": "reflect"},
    fps=1.0, frame_size=256, train_frames=3, train_crop_columns=626,
    description="OGM-GE VGGSound (dataset/VGGSoundDataset.py): 16 kHz, a short clip tiled to "
                "10 s, clipped to [-1, 1], log(|STFT 256/128| + 1e-7) (librosa <= 0.9 reflect "
                "padding) -> 129x1251 stored; the trainer takes a random 5 s window (626 "
                "columns; in eval too with eval_crop: random, as released); 1 fps, 3 frames. "
                "Mono as a 16-bit WAV: OLM's mp4_to_wav.py (-ac 1) exactly; OGM-GE's "
                "(data/VGGSound/mp4_to_wav.py) keeps both channels and librosa averages them, "
                "ours rounds the average: <= 1 LSB (1.5e-5) per sample",
))
register(Preset(
    name="ks", sample_rate=16000, mono_mix="s16", clip_seconds=None, fit="pad",
    spectrogram={"recipe": "kaldi_fbank", "num_mel_bins": 128, "frame_length_ms": 25.0,
                 "frame_shift_ms": 10.0, "window_type": "hanning", "preemphasis": 0.97,
                 "remove_dc_offset": True, "round_to_power_of_two": True, "low_freq": 20.0,
                 "high_freq": 0.0, "use_power": True, "subtract_waveform_mean": True},
    columns=1024, normalise={"mean": -4.503877, "std": 5.141276, "std_factor": 2.0},
    audio_layout="time_freq", frame_pick="segment-start",
    fps=1.0, frame_size=256, train_frames=3,
    description="OGM-GE Kinetics-Sounds (data/KineticSound/process_audio.py): the whole clip "
                "at 16 kHz, mean removed, torchaudio Kaldi fbank (128 mel bins, hanning, 25/10 "
                "ms, no dither, no energy), frames cut or zero-padded to 1024, (x + 4.503877) / "
                "(2 x 5.141276); stored 128x1024 [freq, time], fed to the model as [1, 1024, "
                "128] (time x freq, as released); 1 fps, 3 frames at seg*i (seg = n // 3) in "
                "train and eval (dataset/dataset.py). Audio: the 16-bit mono WAV of OLM's "
                "data/KineticSound/mp4_to_wav.py (-ac 1; OGM-GE ships no WAV script). Within "
                "7e-5 of torchaudio's fbank (tests/data/golden)",
))
register(Preset(
    name="ave", **RELEASED_22K, train_frames=3,
    description="AVE per annotated event with the released AVE audio front end (OLM "
                "data/AVE/mp4_to_wav.py 16 kHz 16-bit mono, librosa 0.8.1 load at 22,050 Hz: "
                "resampy kaiser_best) over the event segment: first 3 s tiled, clipped, "
                "log|STFT| 512/353 reflect-padded -> 257x188; 1 fps, 3 frames. Not OLM's "
                "protocol (one record per video, first 3 s, one frame): use the ave_olm "
                "dataset and the ave-olm preset for that",
))
register(Preset(
    name="ave-olm", **RELEASED_22K, train_frames=1,
    description="OLM AVE (datasets/avedataset.py): one record per video; audio as the 16 kHz "
                "16-bit mono WAV of data/AVE/mp4_to_wav.py (ffmpeg -ac 1: a stereo source "
                "mixed to (L + R) / 2) read as librosa 0.8.1 does at 22,050 Hz (resampy "
                "kaiser_best), its first 3 s (tiled if shorter), clipped to [-1, 1], "
                "log(|STFT 512/353| + 1e-7) (reflect padding) -> 257x188, the same steps as "
                "the cremad preset's golden check; frames at 1 fps over the whole video, one "
                "random frame per sample in training",
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
