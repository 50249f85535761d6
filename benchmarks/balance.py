"""What do the balancing methods cost? Step time of each method / step time of `none`.

Same model and batch, measured side by side in one process (rounds interleaved; the fastest
and the median round), because shared machines are noisy. Tiny and ResNet-18 encoders on
synth-sized inputs.

    .venv/bin/python benchmarks/balance.py --md /tmp/overhead.md --json /tmp/overhead.json
    .venv/bin/python benchmarks/balance.py --device cuda --methods all --precision fp32,bf16

Every method steps through its own `train_step` with the loop's StepContext (its model built as
the loop builds it: `model_fusion`, MMTM blocks, output layer), so methods that replace the step
(Greedy, ReconBoost, ...) are timed as they train. Epoch-level work (`start_epoch`: prototypes,
G-Blending's estimate, Re-learning's diagnosis) is not in a step and not timed here. A method
that cannot be built from a fake batch alone (the uni-modal teacher needs teacher runs) is
listed as skipped with the reason. `--precision bf16` times the step under the loop's bf16
autocast (CUDA only), and adds a column: bf16 step ÷ fp32 step of the same method.

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

from avtrain.balance import all_methods, build_balancer, get_method  # noqa: E402
from avtrain.balance.base import StepContext  # noqa: E402
from avtrain.evaluate import autocast  # noqa: E402
from avtrain.models import MODEL_FLAGS, build_model  # noqa: E402

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
    """One method's model, optimizer and balancer, stepped as the training loop steps them
    (`balancer.train_step` with a StepContext; held-out forward for methods that need one)."""

    def __init__(self, method, encoder, classes, device, batch, val, amp=False):
        torch.manual_seed(0)
        cls = get_method(method)
        self.model = build_model(encoder, cls.model_fusion("concat"), classes,
                                 trained_unimodal_heads=cls.trained_unimodal_heads,
                                 **{flag: getattr(cls, flag) for flag in MODEL_FLAGS})
        self.model.to(device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9,
                                   weight_decay=1e-4)
        config = {"alpha": 0.8, "modulation_start": 0, "modulation_end": 50, "seed": 0,
                  "num_classes": classes, "steps_per_epoch": 100, "world_size": 1}
        self.balancer = build_balancer(method, self.model, config,
                                       modalities=self.model.modalities, device=device)
        self.batch, self.val = batch, val
        self.device = torch.device(device)
        self.amp = amp
        self.step_no = 0

    def _heldout(self):
        train_mode = self.balancer.heldout_train_mode
        if not train_mode:
            self.model.eval()
        with torch.no_grad(), autocast(self.device, self.amp):
            logits = self.model(self.val[0])
        if not train_mode:
            self.model.train()
        self.balancer.heldout(logits, self.val[1])

    def step(self):
        batch, labels = self.batch
        ctx = StepContext(net=self.model, model=self.model, batch={**batch, "label": labels},
                          labels=labels, optimizer=self.opt, epoch=0, step=self.step_no,
                          autocast=lambda: autocast(self.device, self.amp),
                          feed_heldout=self._heldout if self.balancer.needs_heldout else None)
        self.balancer.train_step(ctx)
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
             warmup: int = 2, methods=METHODS, amp: bool = False) -> dict:
    classes = 6
    batch = fake_batch(batch_size, classes, device, seed=0)
    val = fake_batch(batch_size, classes, device, seed=1)
    runners, skipped = {}, {}
    for m in methods:
        try:
            runners[m] = Runner(m, encoder, classes, device, batch, val, amp)
            runners[m].timed(warmup)
        except Exception as e:  # noqa: BLE001 - a method this harness cannot build is listed
            runners.pop(m, None)
            skipped[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            print(f"{m}: skipped ({skipped[m]})", flush=True)
    names = [m for m in methods if m in runners]
    times = {m: [] for m in names}
    for i in range(rounds):
        order = names if i % 2 == 0 else names[::-1]  # no method always runs first
        for m in order:
            times[m].append(runners[m].timed(steps))
    # the fastest round of each method: other jobs on a shared machine only ever add time
    best = {m: min(t) for m, t in times.items()}
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"encoder": encoder, "batch_size": batch_size, "device": device,
            "precision": "bf16" if amp else "fp32", "methods": names, "skipped": skipped,
            "rounds": rounds, "steps_per_round": steps, "step_s": best, "median_step_s": med,
            "ratio": {m: best[m] / best["none"] for m in names},
            "median_ratio": {m: med[m] / med["none"] for m in names}}


# --- report -------------------------------------------------------------------------------------


def overhead_table(rows: list[dict]) -> str:
    """One line per method (so 21 methods fit), one column per (encoder, batch, precision);
    with both precisions, the bf16 ÷ fp32 step time of each method too."""
    names = list(dict.fromkeys(m for r in rows for m in r["methods"]))
    head = [f"{r['encoder']} ×{r['batch_size']} {r['precision']} ({r['device']})" for r in rows]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(rows)]
    for m in names:
        cells = []
        for r in rows:
            if m not in r["step_s"]:
                cells.append("skipped" if m in r["skipped"] else "—")
                continue
            cell = (f"{r['ratio'][m]:.3f}× ({1000 * r['step_s'][m]:.1f} ms; median "
                    f"{r['median_ratio'][m]:.2f}×)")
            fp32 = next((o for o in rows if o["precision"] == "fp32" and o["encoder"] ==
                         r["encoder"] and o["batch_size"] == r["batch_size"]), None)
            if r["precision"] == "bf16" and fp32 and m in fp32["step_s"]:
                cell += f"; bf16/fp32 {r['step_s'][m] / fp32['step_s'][m]:.2f}"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    skipped = {m: why for r in rows for m, why in r["skipped"].items()}
    for m, why in skipped.items():
        lines.append(f"\nskipped {m}: {why}")
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
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, or 'all' (every registered method)")
    p.add_argument("--precision", default="fp32",
                   help="fp32, bf16 or both (fp32,bf16); bf16 is the loop's autocast, CUDA only")
    p.add_argument("--encoders", default="tiny,resnet18")
    p.add_argument("--rounds", type=int, default=0,
                   help="interleaved rounds (default 15 tiny / 5 resnet18 on CPU; 20 on CUDA)")
    p.add_argument("--steps", type=int, default=0,
                   help="steps per round (default 3 tiny / 1 resnet18 on CPU; 10 on CUDA)")
    p.add_argument("--json", help="also write the raw figures here")
    p.add_argument("--md", help="write the tables as markdown here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    methods = (["none", *sorted(m for m in all_methods() if m != "none")]
               if args.methods == "all" else [m for m in args.methods.split(",") if m])
    precisions = [x for x in args.precision.split(",") if x]
    if "bf16" in precisions and torch.device(args.device).type != "cuda":
        p.error("--precision bf16 needs --device cuda (the loop's autocast is CUDA only)")
    cuda = torch.device(args.device).type == "cuda"
    out: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "torch": torch.__version__,
                             "gpu": torch.cuda.get_device_name(0)
                             if torch.cuda.is_available() else None}}
    started = time.time()
    rows = []
    for encoder in [e for e in args.encoders.split(",") if e]:
        small = encoder == "tiny"
        rounds = args.rounds or (20 if cuda else 15 if small else 5)
        steps = args.steps or (10 if cuda else 3 if small else 1)
        batch = 64 if small else args.resnet_batch
        for precision in precisions:
            rows.append(overhead(encoder, batch, args.device, rounds=rounds, steps=steps,
                                 warmup=2 if small or cuda else 1, methods=methods,
                                 amp=precision == "bf16"))
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
