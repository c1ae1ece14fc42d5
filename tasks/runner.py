"""`--runner`: where the per-linear quantization tasks of a block run.

local (default): in the flow's process, one block task after the other.
dask: prefect-dask's DaskTaskRunner on a local cluster of worker *processes* (one thread each).
ray:  prefect-ray's RayTaskRunner on a local Ray instance.

On a machine with several GPUs each worker takes one GPU (dask: worker i -> cuda:i mod n; ray:
each task asks for one GPU and Ray sets CUDA_VISIBLE_DEVICES for it), and `--workers` defaults
to the number of GPUs; on CPU it defaults to 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vptq.config import ConfigError

RUNNERS = ("local", "dask", "ray")


class RunnerError(ConfigError):
    """A runner that cannot be used here (unknown name, package not installed, bad worker count)."""


def default_workers(device: str) -> int:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return torch.cuda.device_count()
    return 2


def check_runner(runner: str, workers: int | None) -> None:
    """The cheap checks, before a job is created: the name, the worker count, the package."""
    if runner not in RUNNERS:
        raise RunnerError(f"--runner {runner}: use one of {', '.join(RUNNERS)}")
    if workers is not None and workers < 1:
        raise RunnerError(f"--workers {workers}: use at least 1 worker process")
    if runner == "local":
        return
    pkg = {"dask": "prefect_dask", "ray": "prefect_ray"}[runner]
    try:
        __import__(pkg)
    except ImportError:
        raise RunnerError(f"--runner {runner} needs the {pkg.replace('_', '-')} package: "
                          f"pip install 'vptq-service[{runner}]'") from None


def make_task_runner(runner: str, workers: int | None, device: str):
    """A fresh (unstarted) Prefect task runner for `runner`, or None for local."""
    check_runner(runner, workers)
    if runner == "local":
        return None
    n = workers or default_workers(device)
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    from prefect_ray import RayTaskRunner

    return RayTaskRunner(init_kwargs={"num_cpus": n, "include_dashboard": False, "log_to_driver": False})


@contextlib.contextmanager
def submit_options(runner: str, device: str) -> Iterator[None]:
    """Per-task resource requests: one GPU per task under Ray when the job runs on CUDA."""
    if runner == "ray" and device.startswith("cuda"):
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=1):
            yield
    else:
        yield


def worker_device(device: str) -> str:
    """The device a task in a worker process should use: `cuda` means this worker's GPU."""
    if device != "cuda":
        return device  # cpu, or an explicit cuda:N
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n <= 1:
        return device  # one GPU visible (under Ray: the one it gave this task)
    try:
        from distributed import get_worker

        return f"cuda:{int(get_worker().name) % n}"
    except (ImportError, ValueError, TypeError):
        return device
