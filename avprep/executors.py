"""Executors: run the same per-shard function on local processes or on a Ray cluster.

Both take a list of jobs and return `{job.name: stats}`; neither knows what a shard is beyond
`job.name` and `len(job.records)` (for the progress bar).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm

from .errors import UserError

EXECUTORS = ("local", "ray")


def _bar(jobs, progress: bool) -> tqdm:
    total = sum(len(j.records) for j in jobs)
    # mininterval keeps a non-interactive log (CI, nohup) readable
    return tqdm(total=total, desc="build-shards", unit="clip", disable=not progress,
                mininterval=2.0, dynamic_ncols=True)


def _done(bar: tqdm, job, stats: dict, failed: list[int]) -> None:
    failed[0] += len(stats.get("failures", []))
    bar.update(len(job.records))
    bar.set_postfix(failed=failed[0], refresh=False)


def run_local(fn: Callable, jobs: list, workers: int = 0, progress: bool = False) -> dict:
    workers = workers or os.cpu_count() or 1
    results: dict[str, dict] = {}
    failed = [0]
    with _bar(jobs, progress) as bar:
        if workers == 1 or len(jobs) == 1:
            for job in jobs:  # no pool: nothing to pickle, nothing to start
                results[job.name] = fn(job)
                _done(bar, job, results[job.name], failed)
            return results
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = {pool.submit(fn, job): job for job in jobs}
            try:
                for future in as_completed(futures):
                    job = futures[future]
                    results[job.name] = future.result()
                    _done(bar, job, results[job.name], failed)
            except BaseException:
                # disk full or Ctrl-C: do not start the shards still queued (they would fail
                # the same way); the pool waits only for the ones already running
                for future in futures:
                    future.cancel()
                raise
    return results


def run_ray(fn: Callable, jobs: list, workers: int = 0, address: str | None = None,
            progress: bool = False) -> dict:
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'avbalance[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False,
                     log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(fn)
        pending = {remote.remote(job): job for job in jobs}
        results: dict[str, dict] = {}
        failed = [0]
        with _bar(jobs, progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    job = pending.pop(ref)
                    results[job.name] = ray.get(ref)
                    _done(bar, job, results[job.name], failed)
        return results
    finally:
        if started_here:
            ray.shutdown()


def run_jobs(fn: Callable, jobs: list, *, executor: str = "local", workers: int = 0,
             ray_address: str | None = None, progress: bool = False) -> dict:
    if executor == "local":
        return run_local(fn, jobs, workers, progress)
    if executor == "ray":
        return run_ray(fn, jobs, workers, ray_address, progress)
    raise UserError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
