"""extract-frames / extract-audio on real encoded clips: frame rule, sizes, HDF5, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from held import start_held, wait_until_held
from mediagen import (
    make_frame_counter,
    make_video,
    make_wav,
    released_frames,
    truncate,
    which_frames,
)

from avprep.datasets import load_dataset
from avprep.errors import UserError
from avprep.frames import expected_frames, extract_audio, extract_frames, read_h5_clip
from avprep.manifest import Record, write_manifest
from avprep.media import decode_clip
from cli import avprep

# (class, name, seconds, input fps, size)
CLIPS = [("a", "long", 2.5, 25, (160, 120)), ("a", "short", 1.4, 30, (160, 120)),
         ("b", "one", 1.0, 25, (160, 120)), ("b", "odd", 1.6, 25, (317, 203))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    for label, name, seconds, fps, size in CLIPS:
        odd = size[0] % 2 or size[1] % 2  # 4:2:0 needs even sizes
        make_video(root / label / f"{name}.mp4", seconds=seconds, fps=fps, size=size,
                   pix_fmt="yuv444p" if odd else "yuv420p")
    m = load_dataset("folder", root)
    durations = {}  # of the video stream: frames / frame rate (2.5 s at 25 fps encodes 63)
    for r in m.records:
        rate = next(c[3] for c in CLIPS if r.key.endswith(c[1]))
        every = decode_clip(r.video, fps=None, short_side=16, sample_rate=None).n_frames
        durations[r.key] = every / rate
    return root, m, durations


def jpgs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"))


def test_expected_frames_rule():
    assert expected_frames(2.5, 1) == 3  # t = 0, 1, 2
    assert expected_frames(2.0, 1) == 2  # t = 0, 1 (t = 2 is the end)
    assert expected_frames(1.4, 1) == 2  # t = 0, 1
    assert expected_frames(1.4, 2) == 3
    assert expected_frames(0.2, 1) == 1


def test_sizes_names_and_index(dataset, tmp_path):
    _root, m, _durations = dataset
    summary = extract_frames(m.records, tmp_path / "out", fps=2, size=64, workers=2)
    assert (summary.done, summary.failed, summary.skipped) == (len(m.records), 0, 0)
    index = {}
    for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines():
        entry = json.loads(line)
        index[entry["key"]] = entry
    for r in m.records:
        files = jpgs(tmp_path / "out" / r.key)
        assert [f.name for f in files] == [f"{i:05d}.jpg" for i in range(len(files))]
        assert index[r.key]["n_frames"] == len(files) > 1
        assert index[r.key]["source"] == r.video
        h, w = cv2.imread(str(files[0])).shape[:2]
        src_w, src_h = next(c[4] for c in CLIPS if r.key.endswith(c[1]))
        assert min(h, w) == 64
        assert abs(max(h, w) - 64 * max(src_w, src_h) / min(src_w, src_h)) <= 1
    assert not (tmp_path / "out" / ".partial").exists()
    assert sum(e["n_frames"] for e in index.values()) == summary.frames


@pytest.mark.parametrize("fps", [1.0, 2.0])
def test_frame_count_follows_the_fps_rule(dataset, tmp_path, fps):
    _root, m, durations = dataset
    extract_frames(m.records, tmp_path / "out", fps=fps, size=32, workers=2)
    got = {r.key: len(jpgs(tmp_path / "out" / r.key)) for r in m.records}
    assert got == {r.key: expected_frames(durations[r.key], fps) for r in m.records}


def test_frame_i_is_the_frame_on_screen_at_i_over_fps(dataset, tmp_path):
    _root, m, _ = dataset
    record = next(r for r in m.records if r.key.endswith("long"))  # 2.5 s at 25 fps
    extract_frames([record], tmp_path / "out", fps=1, size=0, quality=95, workers=1)
    every = decode_clip(record.video, fps=None, short_side=0, sample_rate=None).frames
    picked = []
    for path in jpgs(tmp_path / "out" / record.key):
        frame = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(np.float32)
        picked.append(int(np.argmin([np.abs(frame - f).mean() for f in every])))
    assert picked == [0, 25, 50]  # t = 0, 1, 2 s (the clip lasts 2.52 s)


@pytest.mark.parametrize("fmt", ["jpg", "h5"])
def test_late_video_stream_keeps_its_first_frame(tmp_path, fmt):
    # CREMA-D's FLVs start their video at 25 ms: frame 0 is still the first decoded frame
    flv = make_frame_counter(tmp_path / "1001_DFA_ANG_XX.flv", vcodec="flv", acodec="libmp3lame")
    every, kept = released_frames(flv)
    record = Record(key="late", label="a", label_id=0, split="train", video=str(flv))
    extract_frames([record], tmp_path / "out", fps=1, size=64, fmt=fmt, workers=1)
    if fmt == "jpg":
        blobs = [p.read_bytes() for p in jpgs(tmp_path / "out" / "late")]
    else:
        blobs = read_h5_clip(tmp_path / "out" / "train.h5", "late")
    frames = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in blobs]
    assert which_frames(frames, every) == kept == [0, 30, 60, 90]


def test_hdf5_holds_the_same_jpeg_bytes(dataset, tmp_path):
    _root, m, _ = dataset
    extract_frames(m.records, tmp_path / "jpg", fps=2, size=64, workers=2)
    extract_frames(m.records, tmp_path / "h5", fps=2, size=64, fmt="h5", workers=2)
    splits = {r.split for r in m.records}
    assert sorted(p.name for p in (tmp_path / "h5").glob("*.h5")) == sorted(
        f"{s}.h5" for s in splits)
    for r in m.records:
        stored = read_h5_clip(tmp_path / "h5" / f"{r.split}.h5", r.key)
        assert stored == [p.read_bytes() for p in jpgs(tmp_path / "jpg" / r.key)]
        with h5py.File(tmp_path / "h5" / f"{r.split}.h5", "r") as f:
            assert f[r.key].attrs["fps"] == 2.0
            assert f[r.key].attrs["source"] == r.video
            assert f[r.key].attrs["n_frames"] == len(stored)
    assert not (tmp_path / "h5" / ".staging").exists()
    # resume: a rerun with one more clip keeps the packed clips byte for byte
    extra = Record(key="zz_extra", label="a", label_id=0, split="train",
                   video=m.records[0].video)
    before = {r.key: read_h5_clip(tmp_path / "h5" / f"{r.split}.h5", r.key) for r in m.records}
    summary = extract_frames(m.records + [extra], tmp_path / "h5", fps=2, size=64, fmt="h5",
                             workers=1)
    assert (summary.done, summary.skipped) == (1, len(m.records))
    for r in m.records:
        assert read_h5_clip(tmp_path / "h5" / f"{r.split}.h5", r.key) == before[r.key]
    assert read_h5_clip(tmp_path / "h5" / "train.h5", "zz_extra") == before[m.records[0].key]


def reference_run(records, out: Path) -> Path:
    extract_frames(records, out, fps=2, size=48, workers=2)
    return out


# Three clips done; the fourth has written its first frame and is about to write the second.
HOLD_IN_FOURTH_CLIP = """
from avprep import media

_decode_clip = media.decode_clip
clips = [0]


def decode_then_hold(*args, on_frame=None, **kwargs):
    clips[0] += 1
    if clips[0] == 4:
        save = on_frame

        def on_frame(i, rgb):
            if i == 1:
                hold()
            save(i, rgb)

    return _decode_clip(*args, on_frame=on_frame, **kwargs)


media.decode_clip = decode_then_hold
"""


def test_killed_run_leaves_no_partial_clip_and_rerun_matches(tmp_path, dataset):
    root, _m, _ = dataset
    records = [Record(key=f"clip{i:02d}", label="a", label_id=0, split="train",
                      video=str(root / "a" / "long.mp4")) for i in range(14)]
    manifest = tmp_path / "m.jsonl"
    write_manifest(records, manifest, classes=["a"], dataset="folder")
    out = tmp_path / "out"
    proc = start_held(HOLD_IN_FOURTH_CLIP, "avprep", [
        "extract-frames", "--manifest", str(manifest), "-o", str(out), "--workers", "1", "--size", "48",
        "--fps", "2"])
    wait_until_held(proc)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash, mid-clip (ffmpeg included)
    proc.wait()
    assert len(jpgs(out / ".partial" / "clip03")) == 1  # the fourth clip was half written
    done = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert sorted(p.name for p in done) == ["clip00", "clip01", "clip02"]
    per_clip = len(jpgs(reference_run(records[:1], tmp_path / "one") / records[0].key))
    assert all(len(jpgs(p)) == per_clip for p in done), "a half-written clip has a final name"
    # an older crash's leftovers under .partial are cleared too
    (out / ".partial" / "clip13").mkdir(parents=True, exist_ok=True)
    (out / ".partial" / "clip13" / "00000.jpg").write_bytes(b"half")
    summary = extract_frames(records, out, fps=2, size=48, workers=2)
    assert summary.skipped == len(done) and summary.done == len(records) - len(done)
    reference = reference_run(records, tmp_path / "reference")
    for r in records:
        assert [p.read_bytes() for p in jpgs(out / r.key)] == \
               [p.read_bytes() for p in jpgs(reference / r.key)]
    assert not (out / ".partial").exists()
    keys = [json.loads(x)["key"] for x in (out / "frames.jsonl").read_text().splitlines()]
    assert keys == [r.key for r in records]


def test_broken_videos_are_recorded_and_skipped(tmp_path, dataset):
    root, _m, _ = dataset
    tree = tmp_path / "tree"
    shutil.copytree(root, tree)
    truncate(tree / "a" / "long.mp4", tree / "b" / "cut.mp4", 0.3)
    (tree / "b" / "text.mp4").write_text("not a video\n")
    (tree / "b" / "empty.mp4").write_bytes(b"")
    m = load_dataset("folder", tree)
    out = tmp_path / "out"
    summary = extract_frames(m.records, out, size=32, workers=2)
    broken = {"b_cut", "b_text", "b_empty"}
    assert {f["key"] for f in summary.failures} == broken
    assert summary.done == len(m.records) - 3
    lines = [json.loads(x) for x in (out / "frames-failures.jsonl").read_text().splitlines()]
    assert {x["key"] for x in lines} == broken
    assert all(x["stage"] and x["error"] and x["source"].endswith(".mp4") for x in lines)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")
                  and p.is_dir()) == sorted(r.key for r in m.records if r.key not in broken)
    again = extract_frames(m.records, out, size=32, workers=1)
    assert (again.skipped, again.failed, again.done) == (len(m.records) - 3, 3, 0)


def test_settings_and_foreign_folders_are_protected(dataset, tmp_path):
    _root, m, _ = dataset
    extract_frames(m.records[:1], tmp_path / "out", fps=1, size=32, workers=1)
    with pytest.raises(UserError, match=r"other settings \(fps 1.0 -> 2.0\)"):
        extract_frames(m.records[:1], tmp_path / "out", fps=2, size=32, workers=1)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty and holds no extract"):
        extract_frames(m.records[:1], tmp_path / "home", workers=1)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(spectrum)])


def test_extract_audio_uses_the_separate_wav_when_there_is_one(tmp_path):
    video = make_video(tmp_path / "v.mp4", seconds=1.5, tone=440, size=(64, 48))
    wav = make_wav(tmp_path / "v.wav", seconds=1.5, tone=660, rate=16000)
    records = [Record("with_wav", "x", 0, "train", video=str(video), audio=str(wav)),
               Record("video_only", "x", 0, "train", video=str(video)),
               Record("segment", "x", 0, "test", video=str(video), start=0.5, end=1.0)]
    summary = extract_audio(records, tmp_path / "wav", sample_rate=8000, workers=2)
    assert (summary.done, summary.failed) == (3, 0)
    a, sr = soundfile.read(tmp_path / "wav" / "with_wav.wav")
    assert sr == 8000 and a.ndim == 1 and abs(len(a) - 12000) <= 400
    assert abs(dominant_hz(a, sr) - 660) < 10
    b, _ = soundfile.read(tmp_path / "wav" / "video_only.wav")
    assert abs(dominant_hz(b, sr) - 440) < 10
    c, _ = soundfile.read(tmp_path / "wav" / "segment.wav")
    assert abs(len(c) - 4000) <= 200
    again = extract_audio(records, tmp_path / "wav", sample_rate=8000, workers=1)
    assert (again.done, again.skipped) == (0, 3)


def test_cli_extract_from_a_dataset_root(dataset, tmp_path):
    root, m, _durations = dataset
    runner = CliRunner()
    result = runner.invoke(avprep, ["extract-frames", "--dataset", "folder", "--root", str(root),
                                    "-o", str(tmp_path / "f"), "--size", "32", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert f"{len(m.records)} clips written" in result.output and "Warning" not in result.output
    assert all(jpgs(tmp_path / "f" / r.key) for r in m.records)
    result = runner.invoke(avprep, ["extract-audio", "--dataset", "folder", "--root", str(root),
                                    "-o", str(tmp_path / "w"), "--workers", "2", "--split",
                                    "train"])
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in (tmp_path / "w").glob("*.wav")) == sorted(
        r.key for r in m.records if r.split == "train")


def test_old_source_spellings_work_with_one_deprecation_line(dataset, tmp_path):
    """`manifest DATASET ROOT` and `extract-* SOURCE [--dataset D]` still run, saying once how
    the source is named now; the results equal the new spelling's."""
    root, m, _durations = dataset
    runner = CliRunner()
    old = runner.invoke(avprep, ["manifest", "folder", str(root), "-o", str(tmp_path / "a.jsonl")])
    new = runner.invoke(avprep, ["manifest", "--dataset", "folder", "--root", str(root), "-o",
                                 str(tmp_path / "b.jsonl")])
    assert old.exit_code == new.exit_code == 0, old.output + new.output
    warnings = [line for line in old.output.splitlines() if line.startswith("Warning:")]
    assert warnings == ["Warning: `avprep manifest DATASET ROOT` is deprecated; use `avprep "
                        "manifest --dataset DATASET --root ROOT`."]
    assert "Warning" not in new.output
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    result = runner.invoke(avprep, ["extract-audio", str(tmp_path / "a.jsonl"), "-o",
                                    str(tmp_path / "w"), "--workers", "1", "--sr", "8000"])
    assert result.exit_code == 0, result.output
    assert f"use `avprep extract-audio --manifest {tmp_path / 'a.jsonl'}`" in result.output
    assert len(list((tmp_path / "w").glob("*.wav"))) == len(m.records)
    result = runner.invoke(avprep, ["extract-frames", str(root), "-o", str(tmp_path / "g")])
    assert result.exit_code == 2 and "pass --dataset NAME --root" in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error:")


def test_dataset_options_with_a_manifest_are_refused_not_ignored(dataset, tmp_path):
    root, _m, _durations = dataset
    runner = CliRunner()
    runner.invoke(avprep, ["manifest", "--dataset", "folder", "--root", str(root), "-o",
                           str(tmp_path / "m.jsonl")])
    (tmp_path / "classes.txt").write_text("a\nb\n")
    for command in ("extract-frames", "extract-audio", "build-shards"):
        result = runner.invoke(avprep, [command, "--manifest", str(tmp_path / "m.jsonl"), "-o",
                                        str(tmp_path / command), "--classes-file",
                                        str(tmp_path / "classes.txt")])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [
            "Error: --classes-file applies when reading a dataset root (--dataset/--root); the "
            f"manifest {tmp_path / 'm.jsonl'} already fixes splits, classes and paths"]
        assert not (tmp_path / command).exists()
