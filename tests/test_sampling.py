"""Exact epochs (avtrain.sampling) on real shards: every training sample once per epoch in a
(seed, epoch) order, the same batches whatever the loader workers, on 1 and 2 gloo processes;
sample byte ranges recorded by build-shards equal a scan of the tar; a damaged tar is skipped
and counted through the CLI, and refused in one line with --strict."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from held import HUNG_AFTER_S, REPO

from avtrain.data import open_shards, train_loader
from avtrain.decode import DataOptions
from avtrain.sampling import ExactStream, needed_members, sample_table
from avtrain.tarstream import tar_samples, tar_spans

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def opts_for(shards, **kw):
    return DataOptions.for_shards(shards, image_size=32, **kw)


def tar_keys(shards, split):
    return [s["__key__"] for url in shards.urls(split)
            for s in wds.WebDataset(url, shardshuffle=False)]


def epoch_keys(shards, *, batch, world=1, workers=0, epoch=0, seed=0, **kw):
    """{rank: [keys of each batch]} of one exact epoch."""
    opts = opts_for(shards)
    out = {}
    for rank in range(world):
        loader = train_loader(shards, "train", opts, batch_size=batch, epoch=epoch, seed=seed,
                              rank=rank, world=world, workers=workers, **kw)
        out[rank] = [b["key"] for b in loader]
        assert len(out[rank]) == loader.steps
    return out


@pytest.mark.parametrize("world, batch", [(1, 5), (2, 5), (3, 5)])
def test_an_epoch_is_every_sample_once_less_the_remainder(train_shards, world, batch):
    shards = open_shards(str(train_shards))
    keys = tar_keys(shards, "train")
    n = len(keys)
    assert n % (batch * world)  # a remainder to drop
    per_rank = epoch_keys(shards, batch=batch, world=world)
    steps = n // (batch * world)
    assert all(len(b) == steps and all(len(x) == batch for x in b) for b in per_rank.values())
    seen = [k for b in per_rank.values() for x in b for k in x]
    assert len(seen) == len(set(seen)) == steps * batch * world  # no sample twice
    assert set(seen) <= set(keys)
    # the dropped remainder changes with the epoch (the permutation does)
    later = {k for b in epoch_keys(shards, batch=batch, world=world, epoch=1).values()
             for x in b for k in x}
    assert set(keys) - set(seen) != set(keys) - later
    # the global batches are those of one process with batch x world
    if world > 1:
        one = epoch_keys(shards, batch=batch * world)[0]
        for g, keys_g in enumerate(one):
            assert keys_g == [k for r in range(world) for k in per_rank[r][g]]


def test_order_is_a_function_of_seed_and_epoch(train_shards):
    shards = open_shards(str(train_shards))
    a = epoch_keys(shards, batch=4)[0]
    assert a == epoch_keys(shards, batch=4)[0]
    assert a != epoch_keys(shards, batch=4, epoch=1)[0]
    assert a != epoch_keys(shards, batch=4, seed=1)[0]


def test_different_workers_give_identical_batches(train_shards):
    """Order and augmentation: the tensors themselves are equal, with 0, 1 and 3 workers."""
    shards = open_shards(str(train_shards))
    opts = opts_for(shards, frames=2)
    runs = []
    for workers in (0, 1, 3):
        loader = train_loader(shards, "train", opts, batch_size=4, epoch=2, seed=5,
                              workers=workers)
        runs.append(list(loader))
    base = runs[0]
    assert len(base) > 3
    for other in runs[1:]:
        assert len(other) == len(base)
        for x, y in zip(base, other):
            assert x["key"] == y["key"]
            assert torch.equal(x["visual"], y["visual"]) and torch.equal(x["audio"], y["audio"])
            assert torch.equal(x["label"], y["label"])
    # the augmentation really is random: two epochs crop the same clip differently
    first = {k: v for b in base for k, v in zip(b["key"], b["visual"])}
    again = {k: v for b in train_loader(shards, "train", opts, batch_size=4, epoch=3, seed=5,
                                        workers=0) for k, v in zip(b["key"], b["visual"])}
    common = sorted(set(first) & set(again))
    assert common and any(not torch.equal(first[k], again[k]) for k in common)


WORKERS_UNDER_A_PROCESS_GROUP = """
import json, sys, tempfile
import torch, torch.distributed as dist
from avtrain.data import open_shards, train_loader, eval_loader
from avtrain.decode import DataOptions

def digest(loader):
    return [[b["key"], float(b["visual"].double().sum()), float(b["audio"].double().sum())]
            for b in loader]

if __name__ == "__main__":
    dist.init_process_group("gloo", init_method="file://" + tempfile.mkdtemp() + "/store",
                            rank=0, world_size=1)
    shards = open_shards(sys.argv[1])
    opts = DataOptions.for_shards(shards, image_size=32, frames=2)
    train = train_loader(shards, "train", opts, batch_size=4, epoch=2, seed=5, workers=2)
    start = train.pipeline[0].multiprocessing_context.get_start_method()
    out = {"start": start, "train": digest(train),
           "val": digest(eval_loader(shards, "val", opts, batch_size=4, workers=2))}
    dist.destroy_process_group()
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_workers_under_a_process_group_start_from_a_forkserver(train_shards, tmp_path):
    """Under torch.distributed a forked worker can inherit a lock held by one of gloo's threads
    and wait on it forever (a suite run hung so); there the workers start from a forkserver,
    which pickles the pipeline: the batches must still equal a single process's, bit for bit."""
    from avtrain.data import eval_loader

    script = tmp_path / "workers.py"
    script.write_text(WORKERS_UNDER_A_PROCESS_GROUP)
    proc = subprocess.run([sys.executable, str(script), str(train_shards)], cwd=REPO,
                          capture_output=True, text=True, timeout=HUNG_AFTER_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["start"] == "forkserver"
    shards = open_shards(str(train_shards))
    opts = opts_for(shards, frames=2)

    def digest(loader):
        return [[b["key"], float(b["visual"].double().sum()), float(b["audio"].double().sum())]
                for b in loader]

    assert got["train"] == digest(train_loader(shards, "train", opts, batch_size=4, epoch=2,
                                               seed=5, workers=0))
    # eval batches interleave the workers' shards: the same samples, in another order
    assert sorted(k for b in got["val"] for k in b[0]) == sorted(
        k for b in eval_loader(shards, "val", opts, batch_size=4, workers=0) for k in b["key"])
    alone = train_loader(shards, "train", opts, batch_size=4, workers=2)
    assert alone.pipeline[0].multiprocessing_context is None  # one process keeps fork


def test_an_endless_stream_runs_on_into_the_next_pass(train_shards):
    shards = open_shards(str(train_shards))
    n = len(tar_keys(shards, "val"))
    loader = train_loader(shards, "val", opts_for(shards), batch_size=4, steps=n, workers=0,
                          salt=98)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 4 * n
    passes = [keys[i * n:(i + 1) * n] for i in range(4)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)  # each pass: every sample once
    assert passes[0] != passes[1]  # in a new order


def test_copies_are_extra_items_of_the_epoch(train_shards):
    shards = open_shards(str(train_shards))
    keys = tar_keys(shards, "train")
    copies = {keys[0]: (1, 2), keys[5]: (2,)}
    stream = ExactStream(shards, sample_table(shards, "train"), opts_for(shards), batch_size=1,
                         copies=copies, modalities=2)
    assert stream.steps == len(keys) + 3
    got = [(k, int(m)) for b in stream for k, m in zip(b["key"], b["keep"])]
    assert sorted(got) == sorted([(k, 3) for k in keys] + [(keys[0], 1), (keys[0], 2),
                                                           (keys[5], 2)])


def test_recorded_spans_equal_a_scan_of_the_tar(train_shards, tmp_path):
    shards = open_shards(str(train_shards))
    for url in shards.urls("train"):
        stats = json.loads(open(url[:-4] + ".json").read())
        with open(url, "rb") as f:
            scanned = [list(s) for s in tar_spans(f)]
        assert stats["spans"][os.path.basename(url)] == scanned
        with open(url, "rb") as f:
            samples = list(tar_samples(f, url))
        assert [s[0] for s in scanned] == [s["__key__"] for s in samples]
        data = open(url, "rb").read()
        for (_key, off, n, suffixes), sample in zip(scanned, samples):
            one = list(tar_samples(io.BytesIO(data[off:off + n]), url))
            assert len(one) == 1 and one[0] == sample
            assert set(suffixes.split()) == set(sample) - {"__key__", "__url__"}
    # an older shard set without spans: the table comes from a scan, and is the same
    old = tmp_path / "old"
    shutil.copytree(train_shards, old)
    for stats_path in old.glob("train-*.json"):
        stats = json.loads(stats_path.read_text())
        del stats["spans"]
        stats_path.write_text(json.dumps(stats))
    a, b = sample_table(shards, "train"), sample_table(open_shards(str(old)), "train")
    assert a.keys == b.keys and a.suffixes == b.suffixes
    assert np.array_equal(a.offset, b.offset) and np.array_equal(a.length, b.length)


def damage(shards_dir, victim: int = 1) -> tuple[str, str]:
    """Append a stray `.pyd` member to the first train tar, its key that of the tar's sample
    number `victim` (not adjacent): the tar then holds one more sample, without `.cls`. The
    pickle inside would write a file if anything unpickled it."""
    index = json.loads((shards_dir / "index.json").read_text())
    tar_path = shards_dir / index["splits"]["train"]["shards"][0]["url"]
    with tarfile.open(tar_path) as tar:
        names = [m.name for m in tar.getmembers()]
    key = sorted({n.split(".", 1)[0] for n in names}, key=lambda k: next(
        i for i, n in enumerate(names) if n.startswith(k + ".")))[victim]
    data = pickle.dumps(Boom(str(shards_dir / "unpickled")))
    data += b"\0" * 12000  # past the tar's end padding: the size really changes
    with tarfile.open(tar_path, "a") as tar:
        info = tarfile.TarInfo(f"{key}.pyd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return key, str(tar_path)


class Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_damaged_sample_is_in_the_table_and_dropped_from_its_batch(train_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(train_shards, copy)
    key, tar_path = damage(copy)
    shards = open_shards(str(copy))
    opts = opts_for(shards)
    table = sample_table(shards, "train")
    assert len(table) == len(tar_keys(open_shards(str(train_shards)), "train")) + 1
    assert {table.where(r): why for r, why in table.damaged(needed_members(opts)).items()} == \
        {(key, tar_path): "no .cls member"}
    stream = ExactStream(shards, table, opts, batch_size=len(table))  # one batch of all
    (batch,) = list(stream)
    assert batch["skipped"] == [(key, tar_path, "no .cls member")]
    assert len(batch["key"]) == len(table) - 1 and key in batch["key"]  # the real one stays
    assert not (copy / "unpickled").exists()


def cli_fit(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "from cli import avtrain; avtrain()", "fit",
                           *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=HUNG_AFTER_S)


def fit_args(shards, run, batch):
    return ["--shards", str(shards), "--run-dir", str(run), "--model", "tiny", "--epochs", "1",
            "--batch-size", str(batch), "--image-size", "32", "--workers", "1",
            "--no-progress", "--no-shapley", "--device", "cpu",
            "--lr", "0.05"]


def epoch_record(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in recs if r["kind"] == "epoch"]
    return epoch


@pytest.mark.slow
def test_fit_skips_a_damaged_sample_and_counts_it(train_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(train_shards, copy)
    n = len(tar_keys(open_shards(str(train_shards)), "train"))
    key, tar_path = damage(copy)
    batch = n + 1  # the stray sample is one of the epoch's items: one batch of all of them
    run = tmp_path / "run"
    out = cli_fit(*fit_args(copy, run, batch))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == [f"Warning: skipping damaged sample {key} in {tar_path} (no .cls "
                        "member); counted in train_skipped"]
    epoch = epoch_record(run)
    assert (epoch["train_samples"], epoch["train_distinct"], epoch["train_skipped"]) == \
        (n, n, 1)
    assert not (copy / "unpickled").exists()

    strict = cli_fit(*fit_args(copy, tmp_path / "strict", batch), "--strict")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    lines = strict.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {tar_path}: sample {key} is "
                                                   "damaged (no .cls member)"), strict.stderr
    assert not (tmp_path / "strict" / "metrics.jsonl").exists() or not any(
        '"kind": "step"' in x for x in (tmp_path / "strict" / "metrics.jsonl").open())


def test_one_fit_epoch_sees_every_sample(train_shards, tmp_path):
    n = len(tar_keys(open_shards(str(train_shards)), "train"))
    run = tmp_path / "run"
    from avtrain.loop import fit

    fit({"shards": str(train_shards), "run_dir": str(run), "model": "tiny", "epochs": 1,
         "batch_size": 5, "image_size": 32, "workers": 0, "progress": False,
         "tensorboard": False, "shapley": False, "lr": 0.05})
    epoch = epoch_record(run)
    assert n % 5
    assert epoch["train_samples"] == epoch["train_distinct"] == n - n % 5
    assert epoch["train_skipped"] == 0


@pytest.mark.slow  # two torchrun processes
def test_one_fit_epoch_on_two_gloo_processes_sees_every_sample(train_shards, tmp_path):
    from test_ddp import TORCHRUN, torchrun

    if not os.path.exists(TORCHRUN):
        pytest.skip("torchrun not installed")
    n = len(tar_keys(open_shards(str(train_shards)), "train"))
    run = tmp_path / "ddp"
    torchrun(["fit", *fit_args(train_shards, run, 4)])
    epoch = epoch_record(run)
    assert n % 8
    assert epoch["train_samples"] == epoch["train_distinct"] == n - n % 8
    assert epoch["train_skipped"] == 0


def test_epoch_steps_shorter_is_olm_com_s_zip(train_shards, tmp_path):
    """--epoch-steps shorter: as many steps as the shorter of the train pass (remainder
    dropped) and the held-out pass (last batch kept, as the released eval DataLoader)."""
    from avprep.errors import UserError
    from avtrain.loop import fit
    from avtrain.settings import make_config

    shards = open_shards(str(train_shards))
    n_train, n_val = len(tar_keys(shards, "train")), len(tar_keys(shards, "val"))
    want = min(n_train // 8, -(-n_val // 8))
    assert want < n_train // 8  # the held-out pass really is the shorter
    run = tmp_path / "run"
    summary = fit({"shards": str(train_shards), "run_dir": str(run), "model": "tiny",
                   "method": "olm_com", "epoch_steps": "shorter", "epochs": 1, "batch_size": 8,
                   "image_size": 32, "workers": 0, "progress": False, "tensorboard": False,
                   "shapley": False, "lr": 0.05})
    assert summary["steps"] == want
    epoch = epoch_record(run)
    assert epoch["train_samples"] == epoch["train_distinct"] == want * 8
    with pytest.raises(UserError, match="reads no held-out stream"):
        make_config({"method": "olm", "epoch_steps": "shorter"})


def test_a_run_saved_before_sampling_existed_resumes_resampled(train_shards, tmp_path):
    import yaml

    from avtrain.settings import cli_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")  # only its presence is checked here
    saved = {"shards": str(train_shards), "model": "tiny"}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert cli_config({}, None, str(run)).sampling == "resample"
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "sampling": "exact"}))
    assert cli_config({}, None, str(run)).sampling == "exact"
    assert cli_config({"sampling": "resample"}, None, str(run)).sampling == "resample"
    assert cli_config({}, None, None).sampling == "exact"
