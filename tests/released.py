"""Shared pieces of the differential tests against released code (test_olm_released.py,
test_ogm_released.py) and of the gloo DDP tests (test_balance_ddp.py).

- `ref_trunk`: the tiny encoder's layers in plain torch, for references written without avtrain;
- `make_batches` / `as_batch`: fixed audio-visual batches in which audio knows the label;
- `step_trainer`: a real `avtrain.loop.Trainer` for a tiny model, built the way
  `Trainer.__init__` builds it (`build_training_model`, optimizer, scheduler, balancer), without
  shards: only `Trainer.train_step` is meant to run;
- `assert_fit_refused`: bad input to `avtrain fit` is one `Error:` line (every method's rows);
- `run_gloo`: run a function in N gloo processes and collect what each returns; each process
  leaves its group through `avtrain.distributed.teardown` and fails if a gloo thread survives.
"""

from __future__ import annotations

import glob
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WIDTH = 32  # the tiny encoder's width (avtrain.models.encoders.tiny)


def ref_trunk(channels: int, bn: bool = True) -> nn.Sequential:
    """The tiny encoder's layers up to (not including) pooling: 3 strided conv blocks."""
    layers: list[nn.Module] = []
    for cin, cout in ((channels, WIDTH // 2), (WIDTH // 2, WIDTH), (WIDTH, 2 * WIDTH)):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(cout) if bn else nn.Identity(), nn.ReLU()]
    return nn.Sequential(*layers)


def make_batches(seed: int, n: int, steps: int, classes: int):
    """`steps` (audio [n,1,16,16], visual [n,2,3,16,16] frames-first, labels) batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(0, classes, (n,), generator=g)
        audio = torch.randn(n, 1, 16, 16, generator=g)
        audio[:, 0, 0, :classes] += 2 * F.one_hot(y, classes)  # audio knows the label
        visual = torch.randn(n, 2, 3, 16, 16, generator=g)
        out.append((audio, visual, y))
    return out


def as_batch(item, part=slice(None)) -> dict:
    audio, visual, y = item
    return {"audio": audio[part], "visual": visual[part], "label": y[part]}


def step_trainer(method: str, fusion: str, classes: int, *, bn: bool = True, **settings):
    """A `Trainer` holding what `Trainer.__init__` builds for a tiny model on the CPU (no
    shards: only `train_step` runs). Seed torch before calling it for reproducible weights.
    `bn=False` replaces BatchNorm by Identity (DDP tests: per-rank statistics would differ
    from the global batch's)."""
    from avtrain import distributed as D
    from avtrain.balance import build_balancer
    from avtrain.loop import Trainer, build_optimizer, build_scheduler, build_training_model
    from avtrain.settings import make_config

    c = make_config({"method": method, "model": "tiny", "fusion": fusion, "device": "cpu",
                     "amp": False, **settings})
    t = Trainer.__new__(Trainer)
    t.config, t.ctx, t.opts, t.step = c, D.Context(), None, 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    t.ctx.rank, t.ctx.world = (dist.get_rank(), world) if world > 1 else (0, 1)
    t.model = build_training_model(c, classes)
    if not bn:
        for enc in t.model.encoders.values():
            for i, layer in enumerate(enc.backbone):
                if isinstance(layer, nn.BatchNorm2d):
                    enc.backbone[i] = nn.Identity()
    t.optimizer = build_optimizer(c, t.model.parameters())
    t.scheduler = build_scheduler(c, t.optimizer)
    t.balancer = build_balancer(method, t.model, {**c.to_dict(), "world_size": world},
                                modalities=t.model.modalities)
    t.net = torch.nn.parallel.DistributedDataParallel(t.model) if world > 1 else t.model
    return t


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux: /proc/self/task/*/comm), [] elsewhere."""
    names = []
    for task in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(task) as f:
                name = f.read().strip()
        except OSError:  # the thread ended while we looked
            continue
        if "gloo" in name:
            names.append(name)
    return names


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str, fn) -> None:
    """One rank: join the group, run `fn`, leave through the trainer's own teardown (barrier,
    then destroy), and check that no gloo thread survived it: one that does runs into the
    interpreter's shutdown and can abort the process (see avtrain/distributed.py)."""
    from avtrain import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        result = fn(rank, world)
    finally:
        D.teardown(D.Context(rank, world, owns_group=True))
    left = gloo_threads()
    assert not left, (f"rank {rank}: gloo threads {left} still run after the process group was "
                      "destroyed: something still holds the group")
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_gloo(fn, out_dir, world: int = 2) -> list:
    """`fn(rank, world)` in `world` spawned processes joined in one gloo group; returns what
    each rank's call returned (tensors, dicts, lists: saved and loaded weights-only).
    `fn` must be a module-level function (it is pickled by name)."""
    out_dir = str(out_dir)
    mp.spawn(_gloo_worker, args=(world, os.path.join(out_dir, "init"), out_dir, fn),
             nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True)
            for r in range(world)]


def assert_ranks_equal_one(ranks: list, one: dict) -> None:
    """A 2-rank gloo run agrees with itself (identical parameters and logged metrics on both
    ranks) and with one process given the global batch (to float tolerance)."""
    import pytest

    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    for name, value in one["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-5, atol=1e-6)
    for got, want in zip(ranks[0]["metrics"], one["metrics"]):
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def method_fit_args(method: str, shards, run, epochs: int, *fixed: str, **extra) -> list[str]:
    """`avtrain fit` arguments of a tiny 3-step-per-epoch CPU run of `method` on test shards;
    `fixed` are the method's own flags, `extra` become --key value."""
    args = ["fit", "--shards", str(shards), "--run-dir", str(run), "--method", method,
            "--model", "tiny", "--fusion", "concat", "--epochs", str(epochs), "--batch-size", "4",
            "--steps-per-epoch", "3", "--lr", "0.05", "--image-size", "32", "--workers", "0",
            "--device", "cpu", "--no-progress", "--log-every", "1", "--seed", "1",
            "--scheduler", "none", *fixed]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def fit_and_resume(args_for, full, part, epochs: int = 3) -> tuple[dict, dict]:
    """`avtrain fit` for `epochs` into `full`; for epochs - 1 into `part`, then `--resume` to
    `epochs`. `args_for(run, epochs)` gives the fit arguments. Returns both last checkpoints."""
    from click.testing import CliRunner

    from avtrain.checkpoint import load_checkpoint
    from cli import avtrain

    runner = CliRunner()
    for run, n in ((full, epochs), (part, epochs - 1)):
        out = runner.invoke(avtrain, args_for(run, n))
        assert out.exit_code == 0, out.output
    out = runner.invoke(avtrain, ["fit", "--resume", str(part), "--epochs", str(epochs)])
    assert out.exit_code == 0, out.output
    return load_checkpoint(str(full / "last.pt")), load_checkpoint(str(part / "last.pt"))


def assert_one_error_line(out, words: str | None, run) -> None:
    """A refused command: non-zero exit, one `Error:` line (naming `words`), nothing trained."""
    assert out.exit_code != 0
    lines = [x for x in out.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), out.output
    if words:
        assert words in lines[0]
    assert not (run / "metrics.jsonl").exists()


def assert_fit_refused(shards, run, method: str, settings: dict, words: str | None) -> None:
    """A one-epoch `avtrain fit` of `method` (method_fit_args) with `settings` as --key value
    (replacing a flag method_fit_args gives, such as --fusion) is one `Error:` line naming
    `words`, and nothing trained: the bad-input rows of the contract and of each method file."""
    from click.testing import CliRunner

    from cli import avtrain

    args = method_fit_args(method, shards, run, 1)
    for key, value in settings.items():
        flag = f"--{key.replace('_', '-')}"
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        args += [flag, str(value)]
    assert_one_error_line(CliRunner().invoke(avtrain, args), words, run)


def train_steps(t, data, steps, part=slice(None)):
    """Our real step over `steps` ((epoch, n_steps), ...) of `data` (batch dicts, or
    make_batches items cut to `part`) -> (parameters, step metrics, losses) after each step."""
    params, metrics, losses, step = [], [], [], 0
    for epoch, n_steps in steps:
        t.model.train()
        for _ in range(n_steps):
            t.step = step
            batch = data[step] if isinstance(data[step], dict) else as_batch(data[step], part)
            loss, _ = t.train_step(batch, epoch)
            metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
            losses.append(float(loss.detach()))
            params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
            step += 1
    return params, metrics, losses


def no_dropout(model: nn.Module) -> None:
    """Dropout off (text encoder, attention) so a reference copy sees the same network."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0


def text_batches(seed: int, n: int, steps: int, classes: int, text_seed: int = 11) -> list:
    """`make_batches` with a text modality whose words repeat with the label: batch dicts
    {"audio", "visual", "text" (padded tokens), "label"} for three-modality tests."""
    from avtrain.models.text import encode_text, pad_tokens

    g = torch.Generator().manual_seed(text_seed)
    data = []
    for audio, visual, y in make_batches(seed, n, steps, classes):
        words = [" ".join(["abc", "de", "f"][j] * (1 + int(y[i]))
                          for j in torch.randint(0, 3, (3,), generator=g).tolist())
                 for i in range(n)]
        tokens, _ = pad_tokens([encode_text(w) for w in words])
        data.append({"audio": audio, "visual": visual, "text": tokens, "label": y})
    return data
