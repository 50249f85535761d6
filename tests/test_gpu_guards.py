"""The CUDA-only paths that a CPU machine can still check: the one-GPU-per-process guard before
NCCL starts (seen on a one-GPU machine: two ranks gave a traceback each), and — where a GPU
exists — that a channels-last run trains and resumes."""

from __future__ import annotations

import pytest
import torch

from avprep.errors import UserError
from avtrain import distributed as D


def test_two_processes_on_one_gpu_is_one_error_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    started = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: started.append(dev))
    with pytest.raises(UserError, match=r"started 2 processes .* sees 1 GPU\(s\); NCCL needs one "
                                        r"GPU per process: use --nproc_per_node 1"):
        D.setup("cuda")
    assert started == []  # refused before any CUDA or NCCL work


def test_as_many_processes_as_gpus_pass_the_guard():
    D.check_one_gpu_per_process(2, 2)
    D.check_one_gpu_per_process(1, 8)
    with pytest.raises(UserError):
        D.check_one_gpu_per_process(3, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_channels_last_run_trains_and_resumes(train_shards, tmp_path):
    """NHWC kernels round differently (benchmarks/RESULTS-gpu.md), so no equality with the
    default layout is claimed: the run trains, records the choice, and resumes with it."""
    from avtrain.loop import fit

    args = {"shards": str(train_shards), "model": "tiny", "fusion": "concat", "epochs": 1,
            "image_size": 32, "workers": 0, "progress": False, "device": "cuda",
            "steps_per_epoch": 3, "lr": 0.01, "channels_last": True,
            "run_dir": str(tmp_path / "nhwc")}
    first = fit(args)
    assert first["steps"] == 3
    again = fit({**args, "epochs": 2}, resume=str(tmp_path / "nhwc"))
    assert again["steps"] == 6
    assert "channels_last: true" in (tmp_path / "nhwc" / "config.yaml").read_text()
