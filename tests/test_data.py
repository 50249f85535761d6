"""Data pipelines on real shards (synth media -> avprep.shards.build_shards): batch layout,
exactly-once evaluation across ranks and workers, per-epoch determinism, no pickle."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from avprep.errors import UserError
from avtrain.data import eval_loader, open_shards, train_loader
from avtrain.decode import (
    DataOptions,
    crop_spectrogram,
    decode_sample,
    pick_frames,
    resolve_crop,
    to_device,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def keys_in_tars(shards, split):
    keys = []
    for url in shards.urls(split):
        for sample in wds.WebDataset(url, shardshuffle=False):
            keys.append(sample["__key__"])
    return keys


def opts_for(shards, **kw):
    return DataOptions.for_shards(shards, image_size=kw.pop("image_size", 32), **kw)


def test_index_is_read(train_shards):
    shards = open_shards(str(train_shards))
    assert shards.num_classes == 3 and len(shards.classes) == 3
    assert shards.samples("train") == len(keys_in_tars(shards, "train")) > 0
    assert len(shards.urls("train")) > 1
    assert shards.preset["name"] == "synth"


@pytest.mark.parametrize("sampling", ["exact", "resample"])
def test_train_batch_layout(train_shards, sampling):
    shards = open_shards(str(train_shards))
    opts = opts_for(shards, frames=3)
    batches = list(train_loader(shards, "train", opts, batch_size=4, steps=3, workers=0,
                                shuffle_buffer=20, sampling=sampling))
    assert len(batches) == 3
    b = batches[0]
    # spectrograms travel as the shards store them: float16 (half the bytes)
    assert b["audio"].dtype == torch.float16 and b["audio"].shape[:2] == (4, 1)
    assert b["audio"].shape[2] == 129  # synth preset: STFT 256 -> 129 bins
    # frames travel as uint8 (a quarter of the bytes through the worker queue and the bus)
    assert b["visual"].shape == (4, 3, 3, 32, 32) and b["visual"].dtype == torch.uint8
    assert b["label"].dtype == torch.long and b["label"].shape == (4,)
    assert len(b["key"]) == 4
    on = to_device(b, torch.device("cpu"), opts)
    assert on["visual"].dtype == torch.float32 and on["visual"].shape == (4, 3, 3, 32, 32)
    # ImageNet-normalised: values centred near 0, not raw 0..255 or 0..1
    assert -3.5 < float(on["visual"].min()) < 0 < float(on["visual"].max()) < 3.5
    # exactly torchvision's ToTensor + Normalize of those uint8 frames
    want = (b["visual"].float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.equal(on["visual"], want)
    assert on["audio"].dtype == torch.float32 and on["key"] == b["key"]
    assert torch.equal(on["audio"], b["audio"].float())


def test_resampled_stream_is_a_function_of_seed_and_epoch(train_shards):
    """--sampling resample (the exact epochs' contract is tests/test_sampling.py's): the same
    per (seed, epoch, workers), with replacement, so an epoch repeats some samples."""
    shards = open_shards(str(train_shards))
    opts = opts_for(shards)

    def run(epoch, seed=0, workers=0, steps=4):
        out = list(train_loader(shards, "train", opts, batch_size=4, steps=steps, epoch=epoch,
                                seed=seed, workers=workers, shuffle_buffer=20,
                                sampling="resample"))
        return [k for b in out for k in b["key"]], torch.cat([b["visual"] for b in out])

    keys0, vis0 = run(0)
    keys0b, vis0b = run(0)
    assert keys0 == keys0b and torch.equal(vis0, vis0b)  # augmentation included
    assert run(1)[0] != keys0
    assert run(0, seed=1)[0] != keys0
    k2, v2 = run(0, workers=2)  # worker processes: still reproducible
    assert (k2, v2.shape) == (run(0, workers=2)[0], v2.shape)
    n = shards.samples("train")
    keys = run(0, steps=n // 4)[0]  # an "epoch" of as many samples as the split holds
    assert len(keys) == n - n % 4 and len(set(keys)) < len(keys)  # drawn with replacement


def test_a_damaged_sample_in_a_resampled_stream_is_skipped_and_listed(train_shards, tmp_path):
    from test_sampling import damage

    copy = tmp_path / "shards"
    shutil.copytree(train_shards, copy)
    key, tar_path = damage(copy)
    shards = open_shards(str(copy))
    loader = train_loader(shards, "train", opts_for(shards), batch_size=4, steps=30,
                          workers=0, shuffle_buffer=20, sampling="resample")
    skipped = {tuple(s) for b in loader for s in b["skipped"]}
    assert skipped == {(key, tar_path, "ValueError: sample " + key + " has no .cls member")}
    assert not (copy / "unpickled").exists()


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 0), (2, 1), (3, 2)])
def test_eval_reads_every_sample_exactly_once(train_shards, world, workers):
    shards = open_shards(str(train_shards))
    opts = opts_for(shards)
    expected = sorted(keys_in_tars(shards, "val"))
    seen, sizes = [], []
    for rank in range(world):
        for b in eval_loader(shards, "val", opts, batch_size=4, rank=rank, world=world,
                             workers=workers):
            seen.extend(b["key"])
            sizes.append(len(b["key"]))
    assert sorted(seen) == expected
    assert any(s < 4 for s in sizes) or len(expected) % 4 == 0  # partial batch kept


def test_eval_transforms_are_deterministic(train_shards):
    shards = open_shards(str(train_shards))
    opts = opts_for(shards)
    a = next(iter(eval_loader(shards, "test", opts, batch_size=8, workers=0)))
    b = next(iter(eval_loader(shards, "test", opts, batch_size=8, workers=0)))
    assert a["key"] == b["key"] and torch.equal(a["visual"], b["visual"])
    assert torch.equal(a["audio"], b["audio"])


def test_audio_only_skips_frames(train_shards):
    shards = open_shards(str(train_shards))
    opts = opts_for(shards, modalities=("audio",))
    b = next(iter(eval_loader(shards, "test", opts, batch_size=4, workers=0)))
    assert "visual" not in b and b["audio"].shape[0] == 4


def test_spectrogram_crop_and_frame_picking():
    rng = np.random.default_rng(0)
    spec = np.arange(20 * 100, dtype=np.float32).reshape(20, 100)
    centre = crop_spectrogram(spec, 40, None)
    assert centre.shape == (20, 40) and centre[0, 0] == 30
    starts = {int(crop_spectrogram(spec, 40, rng)[0, 0]) for _ in range(30)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 60
    short = crop_spectrogram(spec[:, :10], 40, None)
    assert short.shape == (20, 40) and short[0, -1] == spec.min()
    assert pick_frames(10, 2, None) == [2, 7]
    assert pick_frames(1, 3, None) == [0, 0, 0]
    picked = pick_frames(10, 3, rng)
    assert picked == sorted(picked) and len(set(picked)) == 3
    assert len(pick_frames(2, 4, rng)) == 4


def test_random_resized_crop_stays_inside_the_image():
    rng = np.random.default_rng(1)
    for h, w in [(64, 64), (240, 320), (20, 300)]:
        for _ in range(200):
            top, left, ch, cw = resolve_crop(rng.random(41), h, w)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
            assert ch > 0 and cw > 0


class Boom:
    """Unpickling this writes a file: proof that something unpickled a shard member."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(train_shards, tmp_path):
    shards = open_shards(str(train_shards))
    sample = next(iter(wds.WebDataset(shards.urls("test")[0], shardshuffle=False)))
    marker = tmp_path / "unpickled"
    sample["pyd"] = pickle.dumps(Boom(str(marker)))
    sample["pickle"] = sample["pyd"]
    out = decode_sample(sample, opts_for(shards), None)
    assert not marker.exists()
    assert set(out) == {"key", "label", "audio", "visual"}
    # and a .npy holding objects is refused instead of unpickled
    buf = io.BytesIO()
    np.save(buf, np.array([Boom(str(marker))], dtype=object), allow_pickle=True)
    sample["spec.npy"] = buf.getvalue()
    with pytest.raises(ValueError):
        decode_sample(sample, opts_for(shards), None)
    assert not marker.exists()


def test_shard_folder_errors(train_shards, tmp_path):
    with pytest.raises(UserError, match="no index.json"):
        open_shards(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        open_shards(str(tmp_path / "missing"))
    copy = tmp_path / "copy"
    shutil.copytree(train_shards, copy)
    index = json.loads((copy / "index.json").read_text())
    index["splits"]["val"] = {"samples": 0, "shards": [], "class_counts": [0, 0, 0]}
    (copy / "index.json").write_text(json.dumps(index))
    shards = open_shards(str(copy))
    with pytest.raises(UserError, match="'val' split is empty"):
        shards.require("val")
    with pytest.raises(UserError, match="larger than the 'train' split"):
        shards.require("train", batch_size=shards.samples("train") + 1)
    os.remove(copy / os.path.basename(shards.urls("train")[0]))
    with pytest.raises(UserError, match="missing"):
        shards.require("train")
    index["splits"]["train"]["shards"][0]["url"] = "../outside.tar"
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="leaves the folder"):
        open_shards(str(copy)).urls("train")


def test_tars_hold_what_the_contract_says(train_shards):
    """The members this reader relies on (guards against a silent format change)."""
    shards = open_shards(str(train_shards))
    with tarfile.open(shards.urls("val")[0]) as tar:
        names = tar.getnames()
    suffixes = {n.split(".", 1)[1] for n in names}
    assert {"spec.npy", "cls", "json", "f000.jpg"} <= suffixes
