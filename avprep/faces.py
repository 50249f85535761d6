"""Face crops for MER-MULTI: the largest face per frame, square, 112x112.

Uses the frontal-face Haar cascade that ships inside the opencv wheel (cv2.data), so nothing
is downloaded. When no face is found the frame's centre square is used instead, and the
share of frames that had a face is reported so a user can see how well detection worked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import UserError

CASCADE = "haarcascade_frontalface_default.xml"


def cascade_path() -> str:
    """Path of the Haar cascade inside the installed opencv package."""
    folder = getattr(getattr(cv2, "data", None), "haarcascades", "") or ""
    path = os.path.join(folder, CASCADE)
    if not os.path.isfile(path):
        raise UserError(f"OpenCV {cv2.__version__} ships no {CASCADE} (opencv 5 wheels dropped "
                        "the cascades); install opencv-python-headless>=4.8,<5")
    return path


_DETECTORS: dict[str, cv2.CascadeClassifier] = {}


def _detector() -> cv2.CascadeClassifier:
    """One classifier per process (loading the XML costs ~50 ms)."""
    path = cascade_path()
    if path not in _DETECTORS:
        classifier = cv2.CascadeClassifier(path)
        if classifier.empty():
            raise UserError(f"{path}: OpenCV could not load the face cascade")
        _DETECTORS[path] = classifier
    return _DETECTORS[path]


def detect_largest(rgb: np.ndarray, min_face: float = 0.08,
                   detect_side: int = 320) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the largest face in an RGB frame, in its pixels; None when none.

    Detection runs on a grey copy whose long side is at most `detect_side` pixels (speed);
    faces smaller than `min_face` of the short side, and detections with far fewer votes than
    the strongest one, are ignored (background texture).
    """
    h, w = rgb.shape[:2]
    scale = min(1.0, detect_side / max(h, w))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        grey = cv2.resize(grey, (round(w * scale), round(h * scale)),
                          interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    smallest = max(12, int(min(grey.shape) * min_face))
    faces, votes = _detector().detectMultiScale2(grey, scaleFactor=1.1, minNeighbors=5,
                                                 minSize=(smallest, smallest))
    if len(faces) == 0:
        return None
    # Weak detections (few overlapping hits) are mostly texture in the background; drop those
    # far below the strongest before taking the largest face.
    strongest = int(max(votes))
    kept = [f for f, v in zip(faces, votes) if int(v) >= max(5, strongest // 4)] or list(faces)
    x, y, fw, fh = max(kept, key=lambda f: (int(f[2]) * int(f[3]), -int(f[0]), -int(f[1])))
    return (int(round(x / scale)), int(round(y / scale)), int(round(fw / scale)),
            int(round(fh / scale)))


def square_crop(rgb: np.ndarray, cx: float, cy: float, side: int) -> np.ndarray:
    """The side x side square centred at (cx, cy); parts outside the frame are black."""
    side = max(1, int(round(side)))
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    h, w = rgb.shape[:2]
    out = np.zeros((side, side, rgb.shape[2]), rgb.dtype)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(w, x0 + side), min(h, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


def centre_crop(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    return square_crop(rgb, w / 2, h / 2, min(h, w))


@dataclass
class FaceCropper:
    """Crop the largest face of each frame to `size` x `size` (centre crop when none)."""

    size: int = 112
    margin: float = 0.25  # extra border around the detected box, as a share of its side
    min_face: float = 0.08

    def crop(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        """(size x size RGB crop, whether a face was found)."""
        box = detect_largest(rgb, self.min_face)
        if box is None:
            square = centre_crop(rgb)
        else:
            x, y, w, h = box
            side = max(w, h) * (1.0 + self.margin)
            square = square_crop(rgb, x + w / 2, y + h / 2, side)
        out = cv2.resize(square, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return out, box is not None

    def crop_all(self, frames: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """Crops of every frame and the ratio of frames in which a face was found."""
        crops, found = [], 0
        for frame in frames:
            crop, ok = self.crop(frame)
            crops.append(crop)
            found += ok
        return crops, (found / len(frames) if frames else 0.0)
