"""Face crops with the Haar cascade shipped in opencv, on a real portrait (skimage astronaut)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from mediagen import astronaut_path, ffmpeg, make_video

from avprep.faces import FaceCropper, cascade_path, centre_crop, detect_largest, square_crop
from avprep.frames import extract_frames
from avprep.manifest import Record


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(astronaut_path())), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def portrait_video(tmp_path_factory) -> Path:
    """The portrait looped into a 2 s H.264 clip."""
    out = tmp_path_factory.mktemp("faces") / "astronaut.mp4"
    ffmpeg("-loop", "1", "-i", str(astronaut_path()), "-t", "2", "-r", "10",
           "-vf", "scale=256:256", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt",
           "yuv420p", str(out))
    return out


def test_cascade_ships_with_opencv():
    path = cascade_path()
    assert os.path.isfile(path) and path.endswith("haarcascade_frontalface_default.xml")


def test_largest_face_found_where_the_face_is(astronaut):
    # the astronaut's face spans about x 170-275, y 60-165 of the 512x512 image
    for side in (256, 512):
        scale = side / 512
        small = cv2.resize(astronaut, (side, side), interpolation=cv2.INTER_AREA)
        x, y, w, h = detect_largest(small)
        cx, cy = (x + w / 2) / scale, (y + h / 2) / scale
        assert 200 < cx < 250 and 90 < cy < 140, (side, (x, y, w, h))
        assert 70 < w / scale < 140


def test_crop_is_square_face_and_differs_from_centre(astronaut):
    crop, found = FaceCropper(size=112).crop(astronaut)
    assert found and crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    centre = cv2.resize(centre_crop(astronaut), (112, 112), interpolation=cv2.INTER_AREA)
    assert np.abs(crop.astype(int) - centre.astype(int)).mean() > 20
    # the face crop matches a crop of the detected box (square, with margin)
    x, y, w, h = detect_largest(astronaut)
    side = max(w, h) * 1.25
    manual = cv2.resize(square_crop(astronaut, x + w / 2, y + h / 2, side), (112, 112),
                        interpolation=cv2.INTER_AREA)
    assert np.array_equal(crop, manual)


def test_no_face_falls_back_to_centre_crop():
    rng = np.random.default_rng(0)
    frame = np.full((120, 200, 3), 90, np.uint8)
    frame[:, 40:160] = rng.integers(0, 255, size=(120, 120, 3), dtype=np.uint8)
    crop, found = FaceCropper(size=112).crop(frame)
    assert not found
    expected = cv2.resize(frame[:, 40:160], (112, 112), interpolation=cv2.INTER_AREA)
    assert np.array_equal(crop, expected)


def test_square_crop_pads_outside_the_frame_with_black():
    frame = np.full((10, 10, 3), 200, np.uint8)
    out = square_crop(frame, 0, 0, 8)  # centred on the corner: 3/4 outside
    assert out.shape == (8, 8, 3)
    assert (out[:4, :] == 0).all() and (out[:, :4] == 0).all() and (out[4:, 4:] == 200).all()


def test_crop_all_reports_the_face_ratio(astronaut):
    blank = np.full_like(astronaut, 128)
    crops, ratio = FaceCropper().crop_all([astronaut, blank, astronaut, blank])
    assert len(crops) == 4 and ratio == 0.5


def test_extract_frames_with_faces_records_the_ratio(portrait_video, tmp_path):
    no_face = make_video(tmp_path / "pattern.mp4", seconds=1.0, size=(160, 120), audio=False)
    records = [Record("astro", "happy", 0, "train", video=str(portrait_video)),
               Record("pattern", "happy", 0, "train", video=str(no_face))]
    summary = extract_frames(records, tmp_path / "out", fps=2, size=256, faces=True,
                             face_size=112, workers=1)
    assert summary.done == 2 and summary.face_ratio == pytest.approx(0.5)
    index = {}
    for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines():
        entry = json.loads(line)
        index[entry["key"]] = entry
    assert index["astro"]["face_ratio"] == 1.0 and index["pattern"]["face_ratio"] == 0.0
    for key in ("astro", "pattern"):
        files = sorted((tmp_path / "out" / key).glob("*.jpg"))
        assert files and all(cv2.imread(str(f)).shape == (112, 112, 3) for f in files)
    assert len(list((tmp_path / "out" / "astro").glob("*.jpg"))) == 4
