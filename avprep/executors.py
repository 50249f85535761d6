"""Executors: run the same per-shard function on local processes or on a Ray cluster.

Both take a list of jobs and return `{job.name: stats}`; neither knows what a shard is beyond
`job.name` and `len(job.records)` (for the progress bar).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

from .errors import UserError

EXECUTORS = ("local", "ray")


def _bar(jobs, progress: bool) -> tqdm:
    total = sum(len(j.records) for j in jobs)
    # mininterval keeps a non-interactive log (CI, nohup) readable
    return tqdm(total=total, desc="build-shards", unit="clip", disable=not progress,
                mininterval=2.0, dynamic_ncols=True)


# Per-sample progress: a worker calls `report_sample(job_name, ok)` after each clip. Inline it
# reaches the bar directly; in a process pool it goes through a queue the pool's initializer
# hands every worker; elsewhere (Ray) it is a no-op and the bar moves shard by shard.
_REPORT: Callable[[str, bool], None] | None = None


def report_sample(job_name: str, ok: bool) -> None:
    if _REPORT is not None:
        _REPORT(job_name, ok)


def _init_worker(queue) -> None:
    global _REPORT
    _REPORT = lambda name, ok: queue.put((name, ok))  # noqa: E731


class _Progress:
    """The bar, moved per sample as reports arrive and topped up when a shard finishes (a
    skipped shard, or an executor that does not report). Late reports of a finished shard are
    ignored, so nothing is counted twice."""

    def __init__(self, jobs, progress: bool):
        self.bar = _bar(jobs, progress)
        self.seen: dict[str, list[int]] = {}  # job name -> [samples, failures] reported
        self.finished: set[str] = set()
        self.failed = 0

    def sample(self, name: str, ok: bool) -> None:
        if name in self.finished:
            return
        counts = self.seen.setdefault(name, [0, 0])
        counts[0] += 1
        if not ok:
            counts[1] += 1
            self.failed += 1
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def shard(self, job, stats: dict) -> None:
        samples, failures = self.seen.pop(job.name, [0, 0])
        self.finished.add(job.name)
        self.failed += max(0, len(stats.get("failures", [])) - failures)
        self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(max(0, len(job.records) - samples))

    def close(self) -> None:
        self.bar.close()


def run_local(fn: Callable, jobs: list, workers: int = 0, progress: bool = False) -> dict:
    global _REPORT
    import multiprocessing
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, wait

    workers = workers or os.cpu_count() or 1
    results: dict[str, dict] = {}
    bar = _Progress(jobs, progress)
    try:
        if workers == 1 or len(jobs) == 1:
            _REPORT = bar.sample
            try:
                for job in jobs:  # no pool: nothing to pickle, nothing to start
                    results[job.name] = fn(job)
                    bar.shard(job, results[job.name])
            finally:
                _REPORT = None
            return results
        reports = multiprocessing.get_context().Queue()

        def drain() -> None:
            while True:
                try:
                    name, ok = reports.get_nowait()
                except queue_mod.Empty:
                    return
                bar.sample(name, ok)

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_init_worker,
                                 initargs=(reports,)) as pool:
            futures = {pool.submit(fn, job): job for job in jobs}
            try:
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    drain()
                    for future in finished:
                        job = futures[future]
                        results[job.name] = future.result()
                        bar.shard(job, results[job.name])
            except BaseException:
                # disk full or Ctrl-C: do not start the shards still queued (they would fail
                # the same way); the pool waits only for the ones already running
                for future in futures:
                    future.cancel()
                raise
        return results
    finally:
        bar.close()


def ray_connect(address: str | None, num_cpus: int | None = None):
    """Import Ray and join the cluster at `address`, or start a local one -> (ray, started_here).

    A failure to join the named cluster is a user mistake (nothing there, or a cluster found
    by "auto" that is shutting down, which Ray reports as LocalRayletDiedError or a
    RuntimeError), so it is one UserError line, never a traceback."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'avbalance[ray]'") from None
    if ray.is_initialized():
        return ray, False
    if not address:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
        return ray, True
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"no Ray cluster at --ray-address {address}: {first} (start one with "
                        "`ray start --head`, or leave --ray-address out for a local Ray)"
                        ) from None
    return ray, True


def run_ray(fn: Callable, jobs: list, workers: int = 0, address: str | None = None,
            progress: bool = False) -> dict:
    ray, started_here = ray_connect(address, workers)
    try:
        remote = ray.remote(num_cpus=1)(fn)
        pending = {remote.remote(job): job for job in jobs}
        results: dict[str, dict] = {}
        bar = _Progress(jobs, progress)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    job = pending.pop(ref)
                    results[job.name] = ray.get(ref)
                    bar.shard(job, results[job.name])
        finally:
            bar.close()
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
