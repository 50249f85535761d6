"""Loader samples/s from object storage vs the local folder (issue #17), side by side, and where
the CPU goes.

The shards of `benchmarks/loader.py` (cremad preset, synth clips) are served by two servers,
each started here in its own process on 127.0.0.1 (a free port): moto's S3 server (the
standard AWS_* variables point the client at it) and Python's http.server over the folder.
`avtrain.data.train_loader` is timed on four sources with the same workers, batch and rounds,
interleaved, fastest round kept, in each sampling mode of `--sampling` (exact epochs, the
default since issue #27, read samples by byte range; `resample` streams whole tars):

local       the folder
s3          s3://bucket/shards, tars streamed (8 MB ranged GETs), no cache
s3+cache    the same with --cache-dir: the first round fills the cache while streaming, later
            rounds read the cached copies
http        http://127.0.0.1:PORT/, one streamed GET per tar (the https read path), no cache

Each round also records the CPU seconds of the client (this process and its loader workers)
and of the server process, per 1,000 samples: on a 2-core machine a server on the same cores
takes CPU from the loader, which a remote endpoint would not.

    .venv/bin/python benchmarks/loader_storage.py --work /tmp/avbench-loader   # prints the table
    .venv/bin/python benchmarks/loader_storage.py --work /tmp/avbench-loader --results R.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loader import machine, make_shards, shard_rate  # noqa: E402

from avtrain.data import open_shards  # noqa: E402
from avtrain.decode import DataOptions  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(argv: list[str], port: int) -> subprocess.Popen:
    """A server process, returned once its port accepts connections."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None:
            raise SystemExit(f"server {argv} exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server {argv} did not listen on {port} within 60 s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_seconds() -> float:
    """CPU of this process and of its reaped children (the loader workers of past rounds)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


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
    ap.add_argument("--sampling", default="exact,resample",
                    help="comma-separated sampling modes to time on every source")
    ap.add_argument("--results", help="append the markdown table to this file")
    args = ap.parse_args(argv)

    work = args.work or tempfile.mkdtemp(prefix="avbench-loader-")
    os.makedirs(work, exist_ok=True)
    shards_dir = make_shards(work, args.clips, max(1, os.cpu_count() or 1))
    s3_port, http_port = free_port(), free_port()
    servers = {"s3": serve(["-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                           s3_port),
               "http": serve(["-m", "http.server", "--bind", "127.0.0.1", "--directory",
                              shards_dir, str(http_port)], http_port)}
    servers["s3+cache"] = servers["s3"]
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        for name in sorted(os.listdir(shards_dir)):
            fs.put_file(os.path.join(shards_dir, name), f"bench/shards/{name}")
        cache = tempfile.mkdtemp(prefix="avbench-cache-")
        sources = {"local": open_shards(shards_dir),
                   "s3": open_shards("s3://bench/shards"),
                   "s3+cache": open_shards("s3://bench/shards", cache, 10 << 30),
                   "http": open_shards(f"http://127.0.0.1:{http_port}")}
        opts = DataOptions.for_shards(sources["local"], image_size=args.image_size,
                                      frames=args.frames)
        modes = [m.strip() for m in args.sampling.split(",") if m.strip()]
        runs = {f"{k} {m}": (k, m) for k in sources for m in modes}
        rates = {k: [] for k in runs}
        cpu = {k: {"client": [], "server": []} for k in runs}
        samples = (args.batches + max(1, args.workers)) * args.batch_size
        for r in range(args.rounds):
            for name, (source, mode) in runs.items():
                shards, server = sources[source], servers.get(source)
                before = (client_seconds(), server and cpu_seconds(server.pid))
                rates[name].append(shard_rate(shards, opts, args, r, sampling=mode))
                cpu[name]["client"].append((client_seconds() - before[0]) / samples * 1000)
                cpu[name]["server"].append(
                    (cpu_seconds(server.pid) - before[1]) / samples * 1000 if server else 0.0)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
                  flush=True)
        load = os.getloadavg()[0]
    finally:
        for proc in servers.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    best = {k: max(v) for k, v in rates.items()}
    lines = [f"## Object storage: local S3 server vs the local folder ({args.date})", "",
             f"Machine: {machine()}; load average {load:.2f} at the end. S3 is moto's server, "
             "http is Python's http.server, each in its own process on 127.0.0.1 (plain http, "
             "loopback). CPU: seconds per 1,000 samples delivered, median over rounds (client "
             "= this process + its loader workers; server = the serving process). Batch "
             f"{args.batch_size}, {args.workers} loader worker(s), {args.batches} timed "
             f"batches x {args.rounds} interleaved rounds, fastest kept; the `cremad` shards "
             "of the benchmark above.", "",
             "| source, sampling | samples/s (best round) | rounds | vs local (same sampling) | "
             "client CPU s/1k | "
             "server CPU s/1k |", "|---|---:|---|---:|---:|---:|"]
    for k, v in rates.items():
        local = best[f"local {runs[k][1]}"]  # the folder in the same sampling mode
        lines.append(f"| {k} | {best[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | "
                     f"{best[k] / local:.2f}x | "
                     f"{statistics.median(cpu[k]['client']):.2f} | "
                     f"{statistics.median(cpu[k]['server']):.2f} |")
    if {"exact", "resample"} <= set(modes):
        lines += ["", "exact ÷ resample (best rounds): " + ", ".join(
            f"{k} {best[f'{k} exact'] / best[f'{k} resample']:.2f}x" for k in sources)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
