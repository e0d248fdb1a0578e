"""`launcher: ray`: every run of a sweep is a Ray task with declared resources, so a sweep fills every GPU of a
cluster (or every core of this machine) without a scheduler of its own.

- No address: a local Ray is started in this process and stopped at the end (nothing to set up). With an address
  (`ray.address`, `--ray_address`, or RAY_ADDRESS) the sweep joins a running cluster (`ray start --head` ...).
- Runs write to the sweep's output dir, which on a cluster must be a filesystem every node shares (NFS, ...): the
  driver reads each run's results.json and progress.json from it, and a retried run resumes from the
  checkpoints its killed attempt left there.
- A run whose worker process dies (killed, out of memory, a node lost) is retried up to `max_retries` times by Ray;
  the retry resumes from the run's last complete checkpoint. A run that fails with an error is not retried (the
  same arguments would fail again): it is listed as failed and the other runs go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from peftlab.runner.errors import InputError
from peftlab.runner.progress import read_progress
from peftlab.runner.sweep import POLL_S, SweepProgress, SweepRun, run_logged
from peftlab.runner.train import this_machine


@dataclass(frozen=True)
class RaySettings:
    """address: a running cluster (None: a local Ray in this process); gpus_per_run None: 1 if the cluster has
    GPUs, else 0; max_retries: attempts after a worker died."""

    address: str | None = None
    gpus_per_run: float | None = None
    cpus_per_run: float = 1.0
    max_retries: int = 2

    @classmethod
    def from_spec(cls, values: dict[str, Any]) -> RaySettings:
        allowed = [f.name for f in fields(cls)]
        values = {k: v for k, v in values.items() if v is not None}
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise InputError(f"sweep: unknown ray setting {unknown[0]!r}; allowed: {', '.join(allowed)}")
        settings = cls(**values)
        for name, low in (("gpus_per_run", 0), ("cpus_per_run", 0), ("max_retries", 0)):
            value = getattr(settings, name)
            if value is not None and (not isinstance(value, int | float) or value < low):
                raise InputError(f"sweep: ray {name} {value!r} is not allowed; allowed: a number >= {low}")
        return settings


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise InputError("the ray launcher needs Ray, an optional extra: pip install 'peftlab[ray]'") from err
    return ray


def _run_task(run: SweepRun) -> tuple[bool, str, float]:
    """The Ray task (in a worker process, maybe on another machine): the run, parsed and trained there."""
    import ray

    launch = {**this_machine("ray"), "ray_node_id": ray.get_runtime_context().get_node_id()}
    return run_logged(run, None, launch)


def run_with_ray(
    runs: list[tuple[int, SweepRun]],
    settings: RaySettings,
    progress: SweepProgress,
    finished: Callable[[int, SweepRun, bool, str, float], None],
) -> None:
    """Submit every run as a task, report each as it ends; the foreground run is the one that reported last."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        gpus = settings.gpus_per_run
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        task = ray.remote(_run_task).options(
            num_cpus=settings.cpus_per_run, num_gpus=gpus, max_retries=settings.max_retries, retry_exceptions=False
        )
        pending = {task.remote(run): (i, run) for i, run in runs}
        submitted = time.perf_counter()
        seen: dict[int, float] = {}  # id of a run -> when its progress was last shown
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                i, run = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died more often than max_retries allows
                    message = str(err).strip().splitlines()[0]
                    outcome = (False, f"{type(err).__name__}: {message}", time.perf_counter() - submitted)
                finished(i, run, *outcome)
            latest = None
            for _, run in pending.values():
                current = read_progress(run.output_dir)
                if current is not None and current.updated > seen.get(id(run), 0):
                    seen[id(run)] = current.updated
                    if latest is None or current.updated > latest[1].updated:
                        latest = (run, current)
            if latest is not None:
                progress.update(*latest)
    finally:
        if started_here:
            ray.shutdown()
