"""What do the balancing methods cost? Step time of each method / step time of `none`.

Same model and batch, measured side by side in one process (rounds interleaved; the fastest
and the median round), because shared machines are noisy. Tiny and ResNet-18 encoders on
synth-sized inputs.

    .venv/bin/python benchmarks/balance.py --md /tmp/overhead.md --json /tmp/overhead.json
    .venv/bin/python benchmarks/balance.py --device cuda

Whether the methods *work* (accuracy, macro-F1, probes, the imbalance gap, over seeds, with
unimodal references) is the product's job now: `avtrain bench` (docs/bench.md).
This script's former `--part quality` is, for the synth setup of RESULTS-balance.md:

    avprep synth /tmp/avb/raw --classes 6 --per-class 100
    avprep build-shards --manifest /tmp/avb/raw/manifest.jsonl -o /tmp/avb/shards --shard-size 200
    avtrain bench --shards /tmp/avb/shards -o /tmp/avb/bench --seeds 3 \
        --methods none,ogm,ogm_ge,olm,olm_com --model tiny --fusion concat --epochs 10 \
        --batch-size 32 --optimizer sgd --lr 0.05 --scheduler none --image-size 64 --workers 2 \
        --device cpu --alpha 0.8 --modulation-end 10 --no-progress
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from avtrain.balance import build_balancer, get_method  # noqa: E402
from avtrain.models import build_model  # noqa: E402

METHODS = ("none", "ogm", "ogm_ge", "olm", "olm_com")


# --- overhead -------------------------------------------------------------------------------


def fake_batch(batch_size: int, classes: int, device, *, spec=(129, 126), frames=2, size=64,
               seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"audio": torch.randn(batch_size, 1, *spec, generator=g),
             "visual": torch.randn(batch_size, frames, 3, size, size, generator=g)}
    labels = torch.randint(0, classes, (batch_size,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}, labels.to(device)


class Runner:
    """One method's model, optimizer and balancer, stepped exactly as the training loop does
    (avtrain/balance/base.py), held-out forward included for olm_com."""

    def __init__(self, method, encoder, classes, device, batch, val):
        torch.manual_seed(0)
        heads = get_method(method).trained_unimodal_heads
        self.model = build_model(encoder, "concat", classes, trained_unimodal_heads=heads)
        self.model.to(device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9,
                                   weight_decay=1e-4)
        config = {"alpha": 0.8, "modulation_start": 0, "modulation_end": 50, "seed": 0}
        self.balancer = build_balancer(method, self.model, config,
                                       modalities=self.model.modalities, device=device)
        self.batch, self.val = batch, val
        self.device = device
        self.step_no = 0

    def step(self):
        batch, labels = self.batch
        logits = self.model(batch)
        loss = self.balancer.loss(logits, labels, epoch=0, step=self.step_no)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.balancer.before_optimizer_step(logits, labels, epoch=0, step=self.step_no)
        self.opt.step()
        self.balancer.after_optimizer_step()
        if self.balancer.needs_heldout:
            self.model.eval()
            with torch.no_grad():
                self.balancer.heldout(self.model(self.val[0]), self.val[1])
            self.model.train()
        self.step_no += 1

    def timed(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return (time.perf_counter() - t0) / steps


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def overhead(encoder: str, batch_size: int, device: str, *, rounds: int, steps: int,
             warmup: int = 2) -> dict:
    classes = 6
    batch = fake_batch(batch_size, classes, device, seed=0)
    val = fake_batch(batch_size, classes, device, seed=1)
    runners = {m: Runner(m, encoder, classes, device, batch, val) for m in METHODS}
    for r in runners.values():
        r.timed(warmup)
    times = {m: [] for m in METHODS}
    for i in range(rounds):
        order = METHODS if i % 2 == 0 else METHODS[::-1]  # no method always runs first
        for m in order:
            times[m].append(runners[m].timed(steps))
    # the fastest round of each method: other jobs on a shared machine only ever add time
    best = {m: min(t) for m, t in times.items()}
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"encoder": encoder, "batch_size": batch_size, "device": device,
            "rounds": rounds, "steps_per_round": steps, "step_s": best, "median_step_s": med,
            "ratio": {m: best[m] / best["none"] for m in METHODS},
            "median_ratio": {m: med[m] / med["none"] for m in METHODS}}


# --- report -------------------------------------------------------------------------------------


def overhead_table(rows: list[dict]) -> str:
    lines = ["| encoder | batch | device | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for r in rows:
        cells = [f"{r['ratio'][m]:.3f}× ({1000 * r['step_s'][m]:.0f} ms; median "
                 f"{r['median_ratio'][m]:.2f}×)" for m in METHODS]
        lines.append(f"| {r['encoder']} | {r['batch_size']} | {r['device']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(out: dict) -> str:
    m = out["machine"]
    parts = [f"machine: {m['cpus']} CPUs, {m['platform']}, torch {m['torch']}, "
             f"GPU: {m['gpu'] or 'none'}; whole run {out['wall_s'] / 60:.1f} min\n"]
    if "overhead" in out:
        parts += ["### Step time ÷ step time of `none` (fastest of interleaved rounds; the "
                  "median ratio in brackets)\n",
                  overhead_table(out["overhead"]), ""]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--resnet-batch", type=int, default=64)
    p.add_argument("--json", help="also write the raw figures here")
    p.add_argument("--md", help="write the tables as markdown here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "torch": torch.__version__,
                             "gpu": torch.cuda.get_device_name(0)
                             if torch.cuda.is_available() else None}}
    started = time.time()
    rows = [overhead("tiny", 64, args.device, rounds=15, steps=3)]
    print(overhead_table(rows), flush=True)
    rows.append(overhead("resnet18", args.resnet_batch, args.device, rounds=5, steps=1,
                         warmup=1))
    print(overhead_table(rows[-1:]), flush=True)
    out["overhead"] = rows
    out["wall_s"] = time.time() - started
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(markdown(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
