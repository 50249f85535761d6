"""The media core against real encoded files and independent decodes (OpenCV, soundfile)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import soundfile as sf
from mediagen import make_frame_counter, released_frames, video_start, which_frames

from avprep import ffmpeg_bin
from avprep.errors import MediaError, UserError
from avprep.media import decode_clip, probe


def dominant_hz(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.argmax(spectrum) * sr / wave.size)


def opencv_frame(path, index: int) -> np.ndarray:
    """An independent decode of one frame, RGB."""
    cap = cv2.VideoCapture(str(path))
    frame = None
    for _ in range(index + 1):
        ok, frame = cap.read()
        assert ok
    cap.release()
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def test_probe_reports_streams_without_ffprobe(media):
    info = probe(media.mp4)
    assert info.has_video and info.has_audio
    assert (info.width, info.height) == (160, 120)
    assert info.fps == pytest.approx(25)
    assert info.duration == pytest.approx(2.0, abs=0.1)
    assert info.audio_rate == 44100 and info.audio_channels == 1
    flv = probe(media.flv)
    assert (flv.video_codec, flv.audio_codec) == ("flv1", "mp3")
    assert not probe(media.no_audio).has_audio


def test_one_pass_decode_matches_independent_decodes(media):
    clip = decode_clip(media.mp4, fps=1, short_side=0, sample_rate=16000)
    # 1 fps over a 2 s clip: the frames on screen at t = 0 s and t = 1 s
    assert clip.n_frames == 2 and len(clip.frames) == 2
    for i, frame in enumerate(clip.frames):
        assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
        # the first frame of each second, not one from the middle of it
        errors = {j: np.abs(frame.astype(int) - opencv_frame(media.mp4, j).astype(int)).mean()
                  for j in (i * 25, i * 25 + 1, i * 25 + 12)}
        assert min(errors, key=errors.get) == i * 25 and errors[i * 25] < 6
    assert clip.audio.dtype == np.float32
    assert clip.audio.size == pytest.approx(2 * 16000, abs=400)
    assert dominant_hz(clip.audio, 16000) == pytest.approx(440, abs=3)


def test_scale_keeps_aspect_with_short_side(media):
    clip = decode_clip(media.odd, fps=1, short_side=256, sample_rate=None)
    h, w, _ = clip.frames[0].shape
    assert min(h, w) == 256
    assert w / h == pytest.approx(317 / 203, rel=0.01)
    assert clip.audio is None
    original = decode_clip(media.odd, fps=1, short_side=0, sample_rate=None)
    assert original.frames[0].shape == (203, 317, 3)


def test_cremad_style_flv_with_separate_wav(media):
    clip = decode_clip(media.flv, audio=media.wav, fps=1, short_side=256, sample_rate=22050)
    assert clip.n_frames == 3  # 2.5 s at 1 fps: t = 0, 1, 2
    assert clip.frames[0].shape == (256, 341, 3)
    # the audio is the WAV's 660 Hz tone, not the FLV's 440 Hz one
    assert dominant_hz(clip.audio, 22050) == pytest.approx(660, abs=3)
    reference, sr = sf.read(media.wav, dtype="float32")
    assert clip.audio.size == pytest.approx(reference.size * 22050 / sr, abs=300)


def test_segment_and_streaming_frames(media):
    seen = []
    clip = decode_clip(media.mp4, fps=2, short_side=64, sample_rate=8000, start=0.4, end=1.4,
                       on_frame=lambda i, f: seen.append((i, f.shape)))
    assert clip.frames == []  # streamed, not kept
    assert clip.n_frames == len(seen) == 2
    assert seen[0] == (0, (64, 85, 3))
    assert clip.audio.size == pytest.approx(8000, abs=200)


def test_no_audio_stream_is_not_an_error(media):
    clip = decode_clip(media.no_audio, fps=1, short_side=0, sample_rate=16000)
    assert clip.audio is None and clip.n_frames == 2
    assert not clip.info.has_audio


def test_six_channel_audio_is_downmixed(media):
    clip = decode_clip(media.six_channel, fps=1, sample_rate=16000)
    assert clip.info.audio_channels == 6
    assert clip.audio.ndim == 1
    assert dominant_hz(clip.audio, 16000) == pytest.approx(440, abs=3)


def test_unicode_and_spaces_in_name(media):
    clip = decode_clip(media.unicode, fps=1, sample_rate=16000)
    assert clip.n_frames == 1 and clip.audio.size > 0


@pytest.mark.parametrize("kind,stage", [("truncated", "decode"), ("empty", "open"),
                                        ("not_media", "decode")])
def test_broken_files_raise_one_line_media_error(media, kind, stage):
    path = getattr(media, kind)
    with pytest.raises(MediaError) as info:
        decode_clip(path, fps=1, sample_rate=16000)
    message = str(info.value)
    assert info.value.stage == stage
    assert str(path) in message and "\n" not in message


def test_missing_file():
    with pytest.raises(MediaError, match="no such file"):
        decode_clip("/nonexistent/clip.mp4")


def test_ffmpeg_resolution_order(monkeypatch, tmp_path):
    ffmpeg_bin.find_ffmpeg.cache_clear()
    real = ffmpeg_bin.find_ffmpeg()
    try:
        monkeypatch.setenv("FFMPEG_BINARY", real)
        ffmpeg_bin.find_ffmpeg.cache_clear()
        assert ffmpeg_bin.find_ffmpeg() == real
        monkeypatch.setenv("FFMPEG_BINARY", str(tmp_path / "no-ffmpeg-here"))
        ffmpeg_bin.find_ffmpeg.cache_clear()
        with pytest.raises(UserError, match="FFMPEG_BINARY"):
            ffmpeg_bin.find_ffmpeg()
    finally:
        ffmpeg_bin.find_ffmpeg.cache_clear()


@pytest.mark.parametrize("start,end,fps,expected", [(0.5, 1.5, 2, 2), (0.3, 2.0, 1, 2),
                                                    (0.3, 2.0, 2, 4), (0.0, 1.0, 1, 1)])
def test_segment_frame_count_is_ceil_of_duration_times_fps(media, start, end, fps, expected):
    # also for segments whose ends fall between two video frames (25 fps: 0.5 s, 0.3 s)
    clip = decode_clip(media.mp4, fps=fps, short_side=0, sample_rate=None, start=start, end=end)
    assert clip.n_frames == expected


@pytest.fixture(scope="module")
def counters(tmp_path_factory):
    """Frame-counter clips: CREMA-D-like FLV (video from 25 ms), mp4 at 25 fps and 29.97 fps."""
    d = tmp_path_factory.mktemp("counters")
    return {"late": make_frame_counter(d / "late.flv", vcodec="flv", acodec="libmp3lame"),
            "mp4": make_frame_counter(d / "c25.mp4", fps=25),
            "ntsc": make_frame_counter(d / "ntsc.mp4", fps="30000/1001")}


def test_late_video_stream_keeps_its_first_frame(counters):
    path = counters["late"]
    assert video_start(path) == pytest.approx(0.025)  # as CREMA-D's VideoFlash
    every, kept = released_frames(path)
    assert kept == [0, 30, 60, 90]
    clip = decode_clip(path, fps=1, short_side=0, sample_rate=16000)  # frames and audio: one pass
    assert which_frames(clip.frames, every) == kept
    assert np.abs(clip.frames[0].astype(int) - clip.frames[1].astype(int)).mean() > 50
    assert clip.audio.size == pytest.approx(3.5 * 16000, abs=1200)


@pytest.mark.parametrize("name,kept", [("mp4", [0, 25, 50, 75]), ("ntsc", [0, 29, 58, 87])])
def test_frames_are_the_released_ones_at_start_zero(counters, name, kept):
    # 29.97 fps: the released loop steps by int(fps) = 29 frames, not by one second
    every, released = released_frames(counters[name])
    assert released == kept
    clip = decode_clip(counters[name], fps=1, short_side=0, sample_rate=None)
    assert which_frames(clip.frames, every) == kept


@pytest.mark.parametrize("name,start,end,fps,kept", [
    ("late", 1.0, 3.0, 1, [30, 60]),  # a segment counts from its first frame
    ("late", 0.0, 2.0, 2, [0, 15, 30, 45]),
    ("mp4", 0.3, 2.0, 2, [8, 20, 33, 45]),  # first frame at/after 0.3 s is frame 8 (0.32 s)
    ("mp4", 0.3, 1.32, 1, [8]),  # frame 33 sits at exactly 1.32 s: outside the segment
    # 29.97 fps: frames 30 (1.001 s) to 89 are in [1, 3), kept every int(29.97) = 29 frames
    ("ntsc", 1.0, 3.0, 1, [30, 59, 88]),
])
def test_segment_frames(counters, name, start, end, fps, kept):
    every, _ = released_frames(counters[name])
    clip = decode_clip(counters[name], fps=fps, short_side=0, sample_rate=8000, start=start,
                       end=end)
    assert which_frames(clip.frames, every) == kept
