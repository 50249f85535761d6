"""Does bf16 autocast pay, and at which batch size? Training samples/s of the audio-visual
ResNet-18 (the released encoders: spectrogram 257x188, frames at 224 px) in fp32 and under the
loop's bf16 autocast, with cuDNN's autotuner off (torch's default, what `avtrain fit` runs) and on,
side by side in one process (rounds interleaved, fastest kept).

    python benchmarks/step_rate.py --device cuda --batches 32,128,256 --md /tmp/step-rate.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from avtrain.evaluate import autocast  # noqa: E402
from avtrain.models import build_model  # noqa: E402


def samples_per_s(model, opt, batch, device, amp: bool, steps: int) -> float:
    def step():
        with autocast(device, amp):
            logits = model(batch)["fused"]
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up (and the autotuner's search when it is on)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(batch["label"]) * steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="32,128,256")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--md", help="write the table here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for bs in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(0)
        batch = {"audio": torch.randn(bs, 1, 257, 188, generator=g),
                 "visual": torch.randn(bs, args.frames, 3, 224, 224, generator=g),
                 "label": torch.randint(0, 6, (bs,), generator=g)}
        batch = {k: v.to(device) for k, v in batch.items()}
        torch.manual_seed(0)
        model = build_model("resnet18", "concat", 6).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        best: dict[tuple, float] = {}
        for _ in range(args.rounds):
            for bench in (False, True):  # here: channels_last weights (cuDNN's NHWC kernels)
                model.to(memory_format=torch.channels_last if bench else torch.contiguous_format)
                for amp in (False, True):
                    rate = samples_per_s(model, opt, batch, device, amp, args.steps)
                    best[(bench, amp)] = max(best.get((bench, amp), 0.0), rate)
        rows.append((bs, best))
        print(bs, {f"{'channels_last' if b else 'default'} {'bf16' if a else 'fp32'}": round(v, 1)
                   for (b, a), v in best.items()}, flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, {gpu}; torch "
             f"{torch.__version__}. ResNet-18 audio + visual, concat, {args.frames} frame(s) at "
             f"224 px, SGD; train samples/s, fastest of {args.rounds} interleaved rounds of "
             f"{args.steps} steps.", "",
             "| batch | fp32 | bf16 | bf16 / fp32 | fp32, channels_last | bf16, channels_last "
             "| bf16 + channels_last / fp32 |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for bs, b in rows:
        lines.append(f"| {bs} | {b[(False, False)]:.0f} | {b[(False, True)]:.0f} | "
                     f"{b[(False, True)] / b[(False, False)]:.2f}x | {b[(True, False)]:.0f} | "
                     f"{b[(True, True)]:.0f} | {b[(True, True)] / b[(False, False)]:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
