"""Do the balancing methods work, and what do they cost? Two measurements, one script.

quality   On the imbalanced synth dataset (audio easy, video harder): `none`, `ogm`,
          `ogm_ge`, `olm`, `olm_com` trained with the same budget (tiny encoders, CPU), 3 seeds
          each, plus audio-only and visual-only reference runs. Reports test accuracy of the
          fused, audio and visual logits and the linear-probe accuracy of the frozen visual
          encoder (the figure that shows whether video was under-trained), mean +- std.
overhead  Step time of each method / step time of `none`, same model and batch, measured side
          by side in one process (rounds interleaved, medians), because shared machines are
          noisy. Tiny and ResNet-18 encoders on synth-sized inputs.

    .venv/bin/python benchmarks/balance.py                 # both, writes RESULTS-balance.md
    .venv/bin/python benchmarks/balance.py --part overhead --device cuda
    .venv/bin/python benchmarks/balance.py --data /tmp/synth-bench   # reuse prepared shards
    .venv/bin/python benchmarks/balance.py --part quality --methods ogm_ge --alphas 0.1,0.8,2
                                                           # an alpha sweep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
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


# --- quality ----------------------------------------------------------------------------------


def prepare_data(root: str, *, per_class: int, classes: int, workers: int) -> str:
    """Synth videos -> shards (skipped when ROOT/shards/index.json exists)."""
    shards = os.path.join(root, "shards")
    if os.path.isfile(os.path.join(shards, "index.json")):
        return shards
    from avprep.synth import SynthConfig, write_synth

    raw = os.path.join(root, "raw")
    if not os.path.isfile(os.path.join(raw, "manifest.jsonl")):
        write_synth(raw, SynthConfig(classes=classes, per_class=per_class), workers=workers)
    build_shards_for(os.path.join(raw, "manifest.jsonl"), shards, workers=workers)
    return shards


def build_shards_for(manifest: str, out: str, *, workers: int) -> None:
    from avprep.manifest import read_manifest
    from avprep.presets import get_preset
    from avprep.shards import build_shards

    man = read_manifest(manifest)
    build_shards(man.records, out, get_preset("synth"), classes=man.classes,
                 dataset=man.dataset or "synth", shard_size=200, workers=workers)


def run_config(shards: str, run_dir: str, method: str, seed: int, *, epochs: int,
               modalities=("audio", "visual"), workers: int = 1, batch_size: int = 32,
               lr: float = 0.05, image_size: int = 64, alpha: float = 0.8) -> dict:
    return {"shards": shards, "run_dir": run_dir, "method": method, "model": "tiny",
            "fusion": "concat", "modalities": list(modalities), "epochs": epochs,
            "batch_size": batch_size, "optimizer": "sgd", "lr": lr, "scheduler": "none",
            "image_size": image_size, "workers": workers, "device": "cpu", "seed": seed,
            "progress": False, "tensorboard": False, "linear_probe": True, "log_every": 10,
            "alpha": alpha, "modulation_start": 0, "modulation_end": epochs}


def test_accs(summary: dict) -> dict:
    test = summary.get("test") or {}
    probe = summary.get("linear_probe") or {}
    out = {"acc": test.get("acc"), "acc_audio": test.get("acc_audio"),
           "acc_visual": test.get("acc_visual")}
    for m in ("audio", "visual", "fused"):
        if m in probe:
            out[f"probe_{m}"] = probe[m]["test_acc"]
    return out


def quality_rows(methods=METHODS, alphas=(0.8,), references: bool = True) -> list[tuple]:
    """(label, method, modalities, alpha) of each row; OGM rows once per alpha (a sweep)."""
    rows = []
    for m in methods:
        ogm = m.startswith("ogm")
        for a in (alphas if ogm else alphas[:1]):
            label = f"{m} (α {a:g})" if ogm and len(alphas) > 1 else m
            rows.append((label, m, ("audio", "visual"), a))
    if references:
        rows += [("audio only", "none", ("audio",), alphas[0]),
                 ("visual only", "none", ("visual",), alphas[0])]
    return rows


def quality(shards: str, runs_root: str, *, seeds, epochs: int, workers: int,
            rows: list[tuple] | None = None) -> dict:
    from avtrain.loop import fit

    results: dict = {}
    for label, method, mods, alpha in rows or quality_rows():
        results[label] = []
        for seed in seeds:
            slug = "".join(c if c.isalnum() or c in "._" else "_" for c in label)
            run = os.path.join(runs_root, f"{slug}-s{seed}")
            t0 = time.time()
            summary = fit(run_config(shards, run, method, seed, epochs=epochs,
                                     modalities=mods, workers=workers, alpha=alpha),
                          overwrite=True)
            accs = test_accs(summary)
            accs["wall_s"] = time.time() - t0
            results[label].append(accs)
            print(f"{label:12s} seed {seed}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in accs.items() if v is not None), flush=True)
    return results


# --- report -------------------------------------------------------------------------------------


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def quality_table(results: dict) -> str:
    cols = ("acc", "acc_audio", "acc_visual", "probe_visual", "probe_audio", "probe_fused")
    lines = ["| run | fused acc | acc_audio | acc_visual | visual probe | audio probe | "
             "fused probe |", "|---|---|---|---|---|---|---|"]
    for label, runs in results.items():
        cells = [mean_std([r.get(c) for r in runs]) for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    if "quality" in out:
        q = out["quality_setup"]
        parts += [f"### Test accuracy, mean ± std over {q['seeds']} seeds "
                  f"({q['epochs']} epochs, synth {q['per_class']} clips per class)\n",
                  quality_table(out["quality"]), ""]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "quality", "overhead"), default="all")
    p.add_argument("--data", help="folder for the synth videos and shards (kept, reused)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resnet-batch", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="quality: comma list of methods to train")
    p.add_argument("--alphas", default="0.8",
                   help="quality: comma list of OGM alphas; several give one row per alpha")
    p.add_argument("--no-references", action="store_true",
                   help="quality: skip the audio-only and visual-only rows")
    p.add_argument("--json", help="also write the raw figures here")
    p.add_argument("--md", help="write the tables as markdown here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "torch": torch.__version__,
                             "gpu": torch.cuda.get_device_name(0)
                             if torch.cuda.is_available() else None}}
    started = time.time()
    if args.part in ("all", "overhead"):
        rows = [overhead("tiny", 64, args.device, rounds=15, steps=3)]
        print(overhead_table(rows), flush=True)
        rows.append(overhead("resnet18", args.resnet_batch, args.device, rounds=5, steps=1,
                             warmup=1))
        print(overhead_table(rows[-1:]), flush=True)
        out["overhead"] = rows
    if args.part in ("all", "quality"):
        root = args.data or tempfile.mkdtemp(prefix="avbalance-bench-")
        shards = prepare_data(root, per_class=args.per_class, classes=6, workers=2)
        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        rows = quality_rows(methods, [float(a) for a in args.alphas.split(",")],
                            references=not args.no_references)
        out["quality"] = quality(shards, os.path.join(root, "runs"),
                                 seeds=list(range(args.seeds)), epochs=args.epochs,
                                 workers=args.workers, rows=rows)
        out["quality_setup"] = {"epochs": args.epochs, "per_class": args.per_class,
                                "seeds": args.seeds, "shards": shards}
        print(quality_table(out["quality"]), flush=True)
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
