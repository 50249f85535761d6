"""AVE as OLM runs it: one record per video (not per annotated event).

OLM's loader (anonymous-gitlab/OLM, datasets/avedataset.py, `AVEDataset.__init__`) reads the
`Category,VideoID,...` list of a split and, when a video id comes again, deletes the earlier
entry and appends it anew, so each video is one sample labelled by its *last* line. Its
`__getitem__` takes the whole 16 kHz WAV (data/AVE/mp4_to_wav.py), loads it at 22,050 Hz, keeps
the first 3 s (`np.tile(samples, 3)[:22050*3]`), clips to [-1, 1], log(|STFT 512/353| + 1e-7),
and picks `min(n, fps=1)` random frame(s) of the 1 fps frame folder
(data/AVE/video_preprocessing.py). The `ave-olm` preset holds the audio and frame part; this
adapter gives the records: key = the video id, no start/end (the whole video is decoded and the
preset keeps its first 3 s).

Splits: trainSet.txt / valSet.txt / testSet.txt as they are (OLM trains on train+val with 5-fold
cross-validation: `avtrain fit --folds 5` does that over our train+val); with Annotations.txt
only, a hash split by video id.
"""

from __future__ import annotations

import os

from ..manifest import Record, hash_split, safe_key
from .ave import label_sources, parse_lines
from .base import Options, Scan


def scan(root: str, defaults: dict, options: Options) -> Scan:
    root, sources, videos = label_sources(root, "ave_olm")
    result = Scan(dataset="ave_olm", root=root)
    chosen: dict[str, tuple] = {}  # video id -> (split, path, line, category, events)
    collapsed = elsewhere = 0
    for split, path in sources:
        for lineno, category, video_id, _start, _end in parse_lines(path):
            if video_id in chosen:
                first_path = chosen[video_id][1]
                if first_path != path:  # listed in two split files: keep the first split's
                    elsewhere += 1
                    continue
                collapsed += 1
                events = chosen[video_id][4] + 1
            else:
                events = 1
            chosen[video_id] = (split, path, lineno, category, events)  # the last line wins
    for video_id, (split, path, lineno, category, events) in chosen.items():
        record = Record(
            key=safe_key(video_id), label=category, label_id=-1,
            split=split or hash_split(video_id, options.val_fraction, options.test_fraction,
                                      salt="ave-video"),
            video=videos.get(video_id),
            extra={"clip": video_id, "video_id": video_id, "events": events,
                   "source": f"{os.path.relpath(path, root)}:{lineno}"},
        )
        (result.records if record.video else result.missing).append(record)
    if collapsed:
        result.notes.append(f"{collapsed} further annotation line(s) of already listed videos "
                            "folded into one record per video (the last line's label, as OLM)")
    if elsewhere:
        result.notes.append(f"{elsewhere} line(s) naming a video already in another split file "
                            "ignored (kept in the first split)")
    result.unlisted = sorted(p for stem, p in videos.items() if stem not in chosen)
    return result
