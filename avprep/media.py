"""Probe and decode media with one ffmpeg process per clip.

`decode_clip` is the floor of data preparation: a single ffmpeg pass that samples frames
(fps + scale filters inside ffmpeg) and resamples mono audio at the same time, streaming both
through pipes. Frames come out as PPM images (self-describing size, so no probe is needed
first) and audio as raw float32, or as the 16-bit samples a mono WAV would hold (`mono_mix`).
Nothing is written to disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import ffmpeg
import numpy as np

from .errors import MediaError
from .ffmpeg_bin import find_ffmpeg

_CHANNELS = {"mono": 1, "stereo": 2, "2.1": 3, "quad": 4, "4.0": 4, "5.0": 5, "5.1": 6,
             "6.1": 7, "7.1": 8}


@dataclass
class MediaInfo:
    """What ffmpeg reports about a file's first video and first audio stream."""

    duration: float | None = None
    has_video: bool = False
    has_audio: bool = False
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    video_codec: str | None = None
    audio_codec: str | None = None
    audio_rate: int | None = None
    audio_channels: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Clip:
    """The result of one decode: sampled frames, mono audio, and what ffmpeg said of the input."""

    frames: list[np.ndarray] = field(default_factory=list)  # RGB uint8 [H, W, 3] each
    audio: np.ndarray | None = None  # float32 [n] mono, None when the input has no audio
    sample_rate: int | None = None
    fps: float | None = None
    n_frames: int = 0  # frames produced (also counts frames handed to `on_frame`)
    info: MediaInfo = field(default_factory=MediaInfo)
    audio_info: MediaInfo | None = None  # set when audio came from a separate file


def _parse_inputs(stderr: str) -> list[MediaInfo]:
    """MediaInfo for every `Input #N` block of ffmpeg's banner."""
    infos: list[MediaInfo] = []
    current: MediaInfo | None = None
    for line in stderr.splitlines():
        if line.startswith("Input #"):
            current = MediaInfo()
            infos.append(current)
            continue
        if line.startswith(("Output #", "Stream mapping")):
            current = None
            continue
        if current is None:
            continue
        stripped = line.strip()
        if stripped.startswith("Duration:"):
            m = re.match(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", stripped)
            if m:
                h, mnt, s = m.groups()
                current.duration = int(h) * 3600 + int(mnt) * 60 + float(s)
        elif stripped.startswith("Stream #") and ": Video: " in stripped and not current.has_video:
            if "attached pic" in stripped:
                continue
            desc = stripped.split(": Video: ", 1)[1]
            current.has_video = True
            current.video_codec = desc.split()[0].rstrip(",")
            size = re.search(r"(?:,|\s)(\d{2,5})x(\d{2,5})(?:[\s,\[]|$)", desc)
            if size:
                current.width, current.height = int(size.group(1)), int(size.group(2))
            rate = re.search(r"([\d.]+k?) fps", desc) or re.search(r"([\d.]+k?) tbr", desc)
            if rate:
                value = rate.group(1)
                current.fps = float(value[:-1]) * 1000 if value.endswith("k") else float(value)
        elif stripped.startswith("Stream #") and ": Audio: " in stripped and not current.has_audio:
            desc = stripped.split(": Audio: ", 1)[1]
            current.has_audio = True
            current.audio_codec = desc.split()[0].rstrip(",")
            rate = re.search(r"(\d+) Hz", desc)
            if rate:
                current.audio_rate = int(rate.group(1))
            parts = [p.strip() for p in desc.split(",")]
            for part in parts:
                layout = part.split("(")[0]
                if layout in _CHANNELS:
                    current.audio_channels = _CHANNELS[layout]
                    break
                m = re.match(r"(\d+) channels", part)
                if m:
                    current.audio_channels = int(m.group(1))
                    break
    return infos


def _last_error(stderr: str) -> str:
    """The most telling line of ffmpeg's stderr, for a one-line failure message."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        low = ln.lower()
        if any(w in low for w in ("error", "invalid", "no such file", "not found", "matches no",
                                  "does not contain", "moov atom", "permission denied")):
            return ln
    return lines[-1] if lines else "ffmpeg failed without a message"


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(f"{path}: no such file", path=path, stage="open")
    if os.path.isdir(path):
        raise MediaError(f"{path}: is a folder, not a media file", path=path, stage="open")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{path}: file is empty (0 bytes)", path=path, stage="open")


def probe(path: str | os.PathLike) -> MediaInfo:
    """Streams, size, fps and duration of a file using ffmpeg alone (ffprobe is not required)."""
    path = os.fspath(path)
    _check_readable(path)
    proc = subprocess.run(
        [find_ffmpeg(), "-hide_banner", "-nostdin", "-i", path],
        capture_output=True, text=True, errors="replace",
    )
    infos = _parse_inputs(proc.stderr)
    if not infos or not (infos[0].has_video or infos[0].has_audio):
        raise MediaError(f"{path}: {_last_error(proc.stderr)}", path=path, stage="probe")
    return infos[0]


def _read_ppm_frames(stream, on_frame: Callable[[int, np.ndarray], None]) -> int:
    """Parse concatenated binary PPM (P6) images from ffmpeg's stdout; returns frame count."""
    count = 0
    while True:
        magic = stream.readline()
        if not magic:
            return count
        if magic.strip() != b"P6":
            raise MediaError(f"unexpected frame header {magic[:16]!r}", stage="decode")
        dims = stream.readline().split()
        maxval = stream.readline().strip()
        if len(dims) != 2 or maxval != b"255":
            raise MediaError("malformed frame header from ffmpeg", stage="decode")
        width, height = int(dims[0]), int(dims[1])
        nbytes = width * height * 3
        data = stream.read(nbytes)
        if len(data) < nbytes:
            return count  # ffmpeg stopped mid-frame (it was killed); drop the partial frame
        on_frame(count, np.frombuffer(data, np.uint8).reshape(height, width, 3))
        count += 1


# Each decoded frame's time becomes n / int(native fps), n its index in decode order (counted
# from the first frame after a segment's start), so `fps=F:round=up` then keeps frame
# floor(j * int(native) / F) as frame j: at F = 1 frame i * int(native), exactly what the
# released extraction keeps (OGM-GE and OLM, data/*/video_preprocessing.py: cv2 reads every
# frame and saves those with count % int(CAP_PROP_FPS) == 0), whatever the stream's start time;
# at F = 2 too (their frame_kept_per_second = 2); at F >= 3 their loop spaces frames
# int(native / F) apart and may keep one frame earlier than this.
# A stream without a frame rate (FR undefined, or below 1) keeps its own timestamps, shifted
# so its first frame is t = 0.
FRAME_TIMELINE = "if(gte(FR,1),N/floor(FR)/TB,PTS-STARTPTS)"


def _build_command(video, audio, *, fps, short_side, sample_rate, start, end, hwaccel,
                   want_video, want_audio, mono_mix="float"):
    seek = {}
    if start is not None and start > 0:
        seek["ss"] = f"{start:.6f}"
    if end is not None:
        seek["t"] = f"{end - (start or 0.0):.6f}"
    outputs = []
    inputs = []
    if video is not None:
        opts = dict(seek)
        if hwaccel:
            opts["hwaccel"] = hwaccel
        inputs.append(ffmpeg.input(video, **opts))
    if audio is not None:
        inputs.append(ffmpeg.input(audio, **seek))
    if want_video:
        stream = inputs[0]["v:0"]
        if "t" in seek:
            # The segment is the frames whose time (from `start`) is below its length; a trim
            # here, before frames are renumbered, rather than `-t` on the output, which would
            # measure the renumbered times (and the input's `-t` alone lets a frame at exactly
            # `end` through).
            stream = stream.filter("trim", end=seek["t"])
        if fps:
            # Count frames, not timestamps: the released extraction keeps decoded frame
            # i * int(native fps) as second i, so a stream that starts late (FLV with MP3
            # audio: 25 ms) still gives its first frame as f000 (see FRAME_TIMELINE).
            stream = (stream.filter("settb", "AVTB").filter("setpts", FRAME_TIMELINE)
                      .filter("fps", fps=fps, round="up"))
        if short_side:
            stream = stream.filter("scale", w=short_side, h=short_side,
                                   force_original_aspect_ratio="increase")
        outputs.append(ffmpeg.output(stream, "pipe:1", format="image2pipe", vcodec="ppm",
                                     pix_fmt="rgb24"))
    if want_audio:
        source = inputs[-1]["a:0"]
        # s16: ffmpeg's integer downmix (gain normalised so L + R cannot clip, (L + R) / 2),
        # exactly the samples `-acodec pcm_s16le -ac 1` writes into a WAV; float: (L + R) / sqrt 2
        fmt = "s16le" if mono_mix == "s16" else "f32le"
        outputs.append(ffmpeg.output(source, "pipe:3", format=fmt, acodec=f"pcm_{fmt}",
                                     ac=1, ar=sample_rate))
    node = ffmpeg.merge_outputs(*outputs) if len(outputs) > 1 else outputs[0]
    node = node.global_args("-hide_banner", "-nostdin", "-nostats")
    return node.compile(cmd=find_ffmpeg())


def _run(cmd: list[str], want_audio: bool, on_frame, timeout: float | None,
         mono_mix: str = "float"):
    """Run one ffmpeg command, reading frames, audio and stderr concurrently."""
    audio_chunks: list[bytes] = []
    stderr_chunks: list[bytes] = []
    read_fd = write_fd = None
    pass_fds: tuple[int, ...] = ()
    if want_audio:
        read_fd, write_fd = os.pipe()
        # pass_fds keeps the descriptor's number in the child: point `pipe:N` at it.
        pass_fds = (write_fd,)
        cmd = [f"pipe:{write_fd}" if a == "pipe:3" else a for a in cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=pass_fds, bufsize=1 << 20)
    if write_fd is not None:
        os.close(write_fd)

    def drain_audio():
        with os.fdopen(read_fd, "rb", buffering=1 << 20) as fh:
            while chunk := fh.read(1 << 20):
                audio_chunks.append(chunk)

    def drain_stderr():
        while chunk := proc.stderr.read(1 << 16):
            stderr_chunks.append(chunk)

    threads = [threading.Thread(target=drain_stderr, daemon=True)]
    if want_audio:
        threads.append(threading.Thread(target=drain_audio, daemon=True))
    for t in threads:
        t.start()
    timer = None
    if timeout:
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
    try:
        n_frames = _read_ppm_frames(proc.stdout, on_frame)
    finally:
        proc.stdout.close()
        returncode = proc.wait()
        for t in threads:
            t.join()
        if timer:
            timer.cancel()
    stderr = b"".join(stderr_chunks).decode("utf-8", "replace")
    audio = None
    if want_audio and mono_mix == "s16":  # as soundfile / librosa / torchaudio read a WAV
        audio = np.frombuffer(b"".join(audio_chunks), "<i2").astype(np.float32) / 32768.0
    elif want_audio:
        audio = np.frombuffer(b"".join(audio_chunks), np.float32)
    return returncode, n_frames, audio, stderr


def decode_clip(
    video: str | os.PathLike | None,
    *,
    audio: str | os.PathLike | None = None,
    fps: float | None = 1.0,
    short_side: int | None = 256,
    sample_rate: int | None = 16000,
    start: float | None = None,
    end: float | None = None,
    frames: bool = True,
    on_frame: Callable[[int, np.ndarray], None] | None = None,
    hwaccel: str | None = None,
    timeout: float | None = None,
    mono_mix: str = "float",
) -> Clip:
    """Decode one clip in one ffmpeg pass.

    `video`: the video file (frames, and audio unless `audio` is given). `audio`: a separate
    audio file (CREMA-D ships its WAVs apart). `fps`: frames per second to sample (at 1 fps,
    frame i is decoded frame i * int(native fps), counted from the stream's first frame, as the
    released extraction; None keeps every frame). `short_side`: resize so the
    shorter side has this many pixels (0 or None keeps the size). `sample_rate`: mono audio rate
    (None: no audio). `start`/`end`: a segment in seconds. `on_frame(i, rgb)`: receive frames as
    they are decoded instead of keeping them, so memory stays bounded on long clips.
    `mono_mix`: "float" (ffmpeg's float downmix) or "s16" (the samples of the 16-bit mono WAV
    `ffmpeg -acodec pcm_s16le -ac 1 -ar RATE` writes, as float32 / 32768; a stereo source is
    3 dB quieter than with "float").

    A missing audio stream is not an error: `Clip.audio` is None. Anything else ffmpeg cannot
    read raises `MediaError` with one line of ffmpeg's explanation.
    """
    video = os.fspath(video) if video is not None else None
    audio = os.fspath(audio) if audio is not None else None
    for path in (video, audio):
        if path is not None:
            _check_readable(path)
    want_video = bool(frames and video is not None)
    want_audio = bool(sample_rate)
    if not want_video and not want_audio:
        raise ValueError("decode_clip: nothing to decode (no frames and no audio requested)")
    if mono_mix not in ("float", "s16"):
        raise ValueError(f"decode_clip: unknown mono_mix {mono_mix!r} (expected float or s16)")
    clip = Clip(sample_rate=sample_rate if want_audio else None, fps=fps)
    kept: list[np.ndarray] = []

    def keep(i, frame):
        if on_frame is not None:
            on_frame(i, frame)
        else:
            kept.append(frame)

    source = video or audio
    for _attempt in range(2):
        cmd = _build_command(video, audio, fps=fps, short_side=short_side,
                             sample_rate=sample_rate, start=start, end=end, hwaccel=hwaccel,
                             want_video=want_video, want_audio=want_audio,
                             mono_mix=mono_mix)
        code, n_frames, samples, stderr = _run(cmd, want_audio, keep, timeout, mono_mix)
        infos = _parse_inputs(stderr)
        if code == 0:
            break
        main = infos[0] if infos else None
        if main is None or not (main.has_video or main.has_audio):
            raise MediaError(f"{source}: {_last_error(stderr)}", path=source, stage="decode")
        audio_src = infos[-1] if audio is not None else main
        missing_audio = want_audio and not audio_src.has_audio
        missing_video = want_video and not main.has_video
        if missing_video:
            raise MediaError(f"{video}: no video stream", path=video, stage="no_video")
        if missing_audio and n_frames == 0:
            want_audio = False  # retry: frames only, the clip simply has no audio
            if not want_video:
                raise MediaError(f"{source}: no audio stream", path=source, stage="no_audio")
            continue
        raise MediaError(f"{source}: {_last_error(stderr)}", path=source, stage="decode")
    else:  # pragma: no cover - the loop always breaks or raises
        raise MediaError(f"{source}: decoding failed", path=source, stage="decode")

    clip.info = infos[0] if infos else MediaInfo()
    if audio is not None and len(infos) > 1:
        clip.audio_info = infos[-1]
    clip.n_frames = n_frames
    clip.frames = kept
    clip.audio = samples if want_audio else None
    if want_video and n_frames == 0:
        raise MediaError(f"{video}: no frame could be decoded", path=video, stage="decode")
    if clip.audio is not None and clip.audio.size == 0 and want_audio:
        raise MediaError(f"{source}: audio stream decoded to no samples", path=source,
                         stage="decode")
    return clip
