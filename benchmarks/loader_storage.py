"""Loader samples/s from object storage vs the local folder (issue #17), side by side.

The shards of `benchmarks/loader.py` (cremad preset, synth clips) are uploaded to moto's S3
server, started here on 127.0.0.1 (a free port; the standard AWS_* variables point the client
at it), and `avtrain.data.train_loader` is timed on three sources with the same workers, batch
and rounds, interleaved, fastest round kept:

local       the folder
s3          s3://bucket/shards, tars streamed (8 MB ranged GETs), no cache
s3+cache    the same with --cache-dir: the first round fills the cache while streaming, later
            rounds read the cached copies

    .venv/bin/python benchmarks/loader_storage.py --work /tmp/avbench-loader   # prints the table
    .venv/bin/python benchmarks/loader_storage.py --work /tmp/avbench-loader --results R.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loader import machine, make_shards, shard_rate  # noqa: E402

from avtrain.data import DataOptions, open_shards  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="folder for clips/shards (default: a temp dir)")
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--shuffle-buffer", type=int, default=200)
    ap.add_argument("--date", default=dt.date.today().isoformat())
    ap.add_argument("--results", help="append the markdown table to this file")
    args = ap.parse_args(argv)

    from moto.server import ThreadedMotoServer

    work = args.work or tempfile.mkdtemp(prefix="avbench-loader-")
    os.makedirs(work, exist_ok=True)
    shards_dir = make_shards(work, args.clips, max(1, os.cpu_count() or 1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    try:
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        for name in sorted(os.listdir(shards_dir)):
            fs.put_file(os.path.join(shards_dir, name), f"bench/shards/{name}")
        cache = tempfile.mkdtemp(prefix="avbench-cache-")
        sources = {"local": open_shards(shards_dir),
                   "s3": open_shards("s3://bench/shards"),
                   "s3+cache": open_shards("s3://bench/shards", cache, 10 << 30)}
        opts = DataOptions.for_shards(sources["local"], image_size=args.image_size,
                                      frames=args.frames)
        rates = {k: [] for k in sources}
        for r in range(args.rounds):
            for name, shards in sources.items():
                rates[name].append(shard_rate(shards, opts, args, r))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
                  flush=True)
        load = os.getloadavg()[0]
    finally:
        server.stop()
    best = {k: max(v) for k, v in rates.items()}
    lines = [f"## Object storage: local S3 server vs the local folder ({args.date})", "",
             f"Machine: {machine()}; load average {load:.2f} at the end. S3 is moto's server "
             "in this process on 127.0.0.1 (plain http, loopback). Batch "
             f"{args.batch_size}, {args.workers} loader worker(s), {args.batches} timed "
             f"batches x {args.rounds} interleaved rounds, fastest kept; the `cremad` shards "
             "of the benchmark above.", "",
             "| source | samples/s (best round) | rounds | vs local |", "|---|---:|---|---:|"]
    for k, v in rates.items():
        lines.append(f"| {k} | {best[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | "
                     f"{best[k] / best['local']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
