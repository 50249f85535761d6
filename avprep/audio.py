"""Spectrogram recipes as pure functions of a waveform.

The STFT is computed with NumPy (no numba start-up cost per worker) and matches
`librosa.stft(center=True, pad_mode="constant", window="hann")`; tests compare the two.
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


@functools.lru_cache(maxsize=16)
def _hann(n: int) -> np.ndarray:
    # periodic Hann, as scipy.signal.get_window("hann", n, fftbins=True)
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float64)


def stft_magnitude(wave: np.ndarray, n_fft: int, hop: int, win_length: int | None = None,
                   center: bool = True) -> np.ndarray:
    """|STFT| as float32 [n_fft // 2 + 1, frames]."""
    wave = np.asarray(wave, dtype=np.float64)
    win_length = win_length or n_fft
    window = np.zeros(n_fft)
    offset = (n_fft - win_length) // 2
    window[offset:offset + win_length] = _hann(win_length)
    if center:
        wave = np.pad(wave, (n_fft // 2, n_fft // 2))
    if wave.size < n_fft:
        wave = np.pad(wave, (0, n_fft - wave.size))
    frames = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * window, axis=1)).T.astype(np.float32)


def stft_log(wave: np.ndarray, n_fft: int, hop: int, eps: float = 1e-7) -> np.ndarray:
    """log(|STFT| + eps): the OGM-GE / OLM spectrogram."""
    return np.log(stft_magnitude(wave, n_fft, hop) + eps)


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


RECIPES = {"stft_log": stft_log, "log_mel": log_mel}
