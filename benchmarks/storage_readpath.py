"""Where the remote read path's time goes: every tar of a shard set read front to back through
`Store.open_read` in one process, as raw 1 MB reads and as the member-by-member tar stream that
webdataset iterates (tarfile `r|*`), no decoding; local folder vs moto's S3 server vs Python's
http.server, both servers in their own processes on 127.0.0.1. Wall and CPU ms per pass.

    .venv/bin/python benchmarks/storage_readpath.py --shards /tmp/avbench-loader/shards
(the shards that `benchmarks/loader_storage.py --work /tmp/avbench-loader` made)
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loader_storage import free_port, serve  # noqa: E402

from avprep.storage import Store  # noqa: E402


def read_pass(store: Store, tars: list[str], as_tar: bool) -> tuple[float, float, int]:
    wall, cpu, members = time.perf_counter(), time.process_time(), 0
    for name in tars:
        with store.open_read(name) as fh:
            if as_tar:
                with tarfile.open(fileobj=fh, mode="r|*") as tf:
                    for member in tf:
                        tf.extractfile(member).read()
                        members += 1
            else:
                while fh.read(1 << 20):
                    pass
    return time.perf_counter() - wall, time.process_time() - cpu, members


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, help="a local shard folder")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    tars = sorted(n for n in os.listdir(args.shards) if n.endswith(".tar"))
    s3_port, http_port = free_port(), free_port()
    servers = [serve(["-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], s3_port),
               serve(["-m", "http.server", "--bind", "127.0.0.1", "--directory", args.shards,
                      str(http_port)], http_port)]
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        for name in tars:
            fs.put_file(os.path.join(args.shards, name), f"bench/shards/{name}")
        stores = {"local": Store(args.shards), "s3": Store("s3://bench/shards"),
                  "http": Store(f"http://127.0.0.1:{http_port}")}
        for store in stores.values():
            read_pass(store, tars, True)  # first use: filesystem objects, connections
        mb = sum(os.path.getsize(os.path.join(args.shards, n)) for n in tars) / 1e6
        print(f"{len(tars)} tars, {mb:.1f} MB; best of {args.rounds} rounds")
        print("| source | raw reads: wall / CPU ms | tar stream: wall / CPU ms | members |")
        print("|---|---:|---:|---:|")
        for name, store in stores.items():
            raw = min(read_pass(store, tars, False) for _ in range(args.rounds))
            tar = min(read_pass(store, tars, True) for _ in range(args.rounds))
            print(f"| {name} | {raw[0] * 1e3:.1f} / {raw[1] * 1e3:.1f} | "
                  f"{tar[0] * 1e3:.1f} / {tar[1] * 1e3:.1f} | {tar[2]} |")
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
