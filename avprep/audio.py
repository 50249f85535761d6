"""Spectrogram recipes as pure functions of a waveform.

The STFT is computed with NumPy (no numba start-up cost per worker) and matches
`librosa.stft(center=True, window="hann")` with `pad_mode="constant"` (librosa >= 0.10's default)
or `pad_mode="reflect"` (the default of librosa <= 0.9, which the released OGM-GE / OLM code ran:
OLM's requirements.txt pins librosa 0.8.1); tests compare the two.

`kaldi_fbank` is Kaldi's filterbank as `torchaudio.compliance.kaldi.fbank` computes it, written
from Kaldi's documented algorithm (feat/feature-window.cc, feature-fbank.cc, mel-computations.cc)
and torchaudio's defaults; it is the Kinetics-Sounds recipe of OGM-GE (Peng et al., "Balanced
Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022; code: GeWu-Lab/OGM-GE_CVPR2022,
data/KineticSound/process_audio.py). The tests check it against `kaldi-native-fbank`, an
independent implementation of the same algorithm.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def fit_length(wave: np.ndarray, n_samples: int, mode: str = "pad") -> np.ndarray:
    """Trim to `n_samples`, or lengthen: `tile` repeats the clip (the CREMA-D seed recipe),
    `pad` appends silence."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.size >= n_samples:
        return wave[:n_samples]
    if mode == "tile" and wave.size > 0:
        return np.tile(wave, math.ceil(n_samples / wave.size))[:n_samples]
    if mode not in ("tile", "pad"):
        raise ValueError(f"unknown fit mode {mode!r} (expected 'tile' or 'pad')")
    return np.pad(wave, (0, n_samples - wave.size))


def resample(wave: np.ndarray, orig_sr: int, target_sr: int,
             method: str = "kaiser_best") -> np.ndarray:
    """float32 `wave` from `orig_sr` to `target_sr`.

    "kaiser_best" is what `librosa.load(path, sr=...)` did up to librosa 0.9 (the released
    OGM-GE / OLM loaders ran 0.8.1, core/audio.py resample()): resampy's band-limited
    interpolation with its kaiser_best filter, then the length fixed to ceil(n * ratio) by
    padding zeros (resampy gives floor(n * ratio)). "soxr_hq" is soxr at HQ quality.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if method == "kaiser_best":
        import resampy

        out = resampy.resample(wave, orig_sr, target_sr, filter="kaiser_best", axis=-1)
        n = int(np.ceil(wave.shape[-1] * (float(target_sr) / orig_sr)))  # librosa's expression
        return fit_length(out, n, "pad")
    if method == "soxr_hq":
        import soxr

        return soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32)
    raise ValueError(f"unknown resampling method {method!r} (expected kaiser_best or soxr_hq)")


@functools.lru_cache(maxsize=16)
def _hann(n: int) -> np.ndarray:
    # periodic Hann, as scipy.signal.get_window("hann", n, fftbins=True)
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float64)


def stft_magnitude(wave: np.ndarray, n_fft: int, hop: int, win_length: int | None = None,
                   center: bool = True, pad_mode: str = "constant") -> np.ndarray:
    """|STFT| as float32 [n_fft // 2 + 1, frames]; `pad_mode` ("constant" or "reflect") is how
    a centred STFT pads the ends, as librosa's argument of that name."""
    wave = np.asarray(wave, dtype=np.float64)
    win_length = win_length or n_fft
    window = np.zeros(n_fft)
    offset = (n_fft - win_length) // 2
    window[offset:offset + win_length] = _hann(win_length)
    if center:
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"unknown pad_mode {pad_mode!r} (expected 'constant' or 'reflect')")
        if pad_mode == "reflect" and wave.size > n_fft // 2:
            wave = np.pad(wave, (n_fft // 2, n_fft // 2), mode="reflect")
        else:
            wave = np.pad(wave, (n_fft // 2, n_fft // 2))
    if wave.size < n_fft:
        wave = np.pad(wave, (0, n_fft - wave.size))
    frames = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * window, axis=1)).T.astype(np.float32)


def stft_log(wave: np.ndarray, n_fft: int, hop: int, eps: float = 1e-7,
             pad_mode: str = "constant") -> np.ndarray:
    """log(|STFT| + eps): the OGM-GE / OLM spectrogram."""
    return np.log(stft_magnitude(wave, n_fft, hop, pad_mode=pad_mode) + eps)


@functools.lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax,
                               htk=True).astype(np.float32)


def log_mel(wave: np.ndarray, sr: int, n_mels: int = 128, win_ms: float = 25.0,
            hop_ms: float = 10.0, n_fft: int | None = None, fmin: float = 20.0,
            fmax: float | None = None, eps: float = 1e-6) -> np.ndarray:
    """log(mel power + eps), frames of `win_ms` every `hop_ms` without centring (Kaldi-style
    framing, as AST-style fbanks)."""
    win = int(round(sr * win_ms / 1000))
    hop = int(round(sr * hop_ms / 1000))
    n_fft = n_fft or 1 << (win - 1).bit_length()
    power = stft_magnitude(wave, n_fft, hop, win_length=win, center=False) ** 2
    return np.log(_mel_basis(sr, n_fft, n_mels, fmin, fmax) @ power + eps)


def fit_columns(spec: np.ndarray, n_columns: int, value: float = 0.0) -> np.ndarray:
    """Pad (with `value`) or trim the time axis to exactly `n_columns`."""
    if spec.shape[1] >= n_columns:
        return spec[:, :n_columns]
    return np.pad(spec, ((0, 0), (0, n_columns - spec.shape[1])), constant_values=value)


def _kaldi_mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int, padded: int, sr: float, low_freq: float,
                    high_freq: float) -> np.ndarray:
    """Kaldi's triangular mel filters [num_bins, padded // 2 + 1] (the Nyquist column is 0):
    equally spaced in Kaldi's mel scale 1127·ln(1 + f/700) between low_freq and high_freq
    (high_freq <= 0 counts down from Nyquist), weights the min of the rising and falling
    slopes measured in mel, clamped at 0. No VTLN warping (torchaudio's default warp 1.0)."""
    nyquist = 0.5 * sr
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"kaldi_fbank: need 0 <= low_freq < high_freq <= Nyquist, got "
                         f"low_freq={low_freq}, high_freq={high_freq}, Nyquist={nyquist}")
    mel_low, mel_high = _kaldi_mel(low_freq), _kaldi_mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]
    left, centre, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _kaldi_mel(sr / padded * np.arange(padded // 2))[None, :]
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1)))


def kaldi_fbank(wave: np.ndarray, sr: int, num_mel_bins: int = 23, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, window_type: str = "povey",
                preemphasis: float = 0.97, remove_dc_offset: bool = True,
                round_to_power_of_two: bool = True, low_freq: float = 20.0,
                high_freq: float = 0.0, use_power: bool = True,
                subtract_waveform_mean: bool = False) -> np.ndarray:
    """Log mel filterbank energies as `torchaudio.compliance.kaldi.fbank` with dither=0,
    snip_edges=True, use_energy=False, use_log_fbank=True, returned float32 [num_mel_bins,
    frames] (torchaudio returns [frames, bins]; shards store [freq, time]).

    Per frame of int(sr·frame_length) samples every int(sr·frame_shift) (only whole frames:
    1 + (n − length) // shift of them): remove the frame's mean, pre-emphasise x[i] −
    c·x[i−1] (x[−1] = x[0]), window, zero-pad to the next power of two, |rfft|², Kaldi mel
    filters, log(max(E, float32 eps)). `subtract_waveform_mean` first removes the whole
    waveform's mean (OGM-GE's KS script does `waveform - waveform.mean()` before fbank).
    `window_type`: "hanning" (0.5 − 0.5·cos(2πn/(N−1))), "hamming", "povey" (hanning^0.85) or
    "rectangular".
    """
    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    if subtract_waveform_mean and x.size:
        x = x - x.mean()
    length = int(sr * frame_length_ms * 0.001)
    shift = int(sr * frame_shift_ms * 0.001)
    padded = 1 << (length - 1).bit_length() if round_to_power_of_two else length
    banks = kaldi_mel_banks(int(num_mel_bins), padded, float(sr), float(low_freq),
                            float(high_freq))
    if x.size < length:
        return np.zeros((int(num_mel_bins), 0), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, length)[::shift].copy()
    if remove_dc_offset:
        frames -= frames.mean(axis=1, keepdims=True)
    if preemphasis:
        prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
        frames = frames - preemphasis * prev
    n = np.arange(length)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / (length - 1))
    windows = {"hanning": hann, "povey": hann ** 0.85, "rectangular": np.ones(length),
               "hamming": 0.54 - 0.46 * np.cos(2 * np.pi * n / (length - 1))}
    if window_type not in windows:
        raise ValueError(f"unknown window_type {window_type!r} (expected one of "
                         f"{', '.join(windows)})")
    spectrum = np.abs(np.fft.rfft(frames * windows[window_type], n=padded, axis=1))
    if use_power:
        spectrum = spectrum ** 2
    energies = spectrum @ banks.T
    eps = float(np.finfo(np.float32).eps)
    return np.log(np.maximum(energies, eps)).T.astype(np.float32)


RECIPES = {"stft_log": stft_log, "log_mel": log_mel, "kaldi_fbank": kaldi_fbank}
