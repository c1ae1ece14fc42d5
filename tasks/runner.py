"""`--runner`: where the per-linear quantization tasks of a block run.

local (default): in the flow's process, one block task after the other.
dask: prefect-dask's DaskTaskRunner on a local cluster of worker *processes* (one thread each).
ray:  prefect-ray's RayTaskRunner on a local Ray instance.

On a machine with several GPUs each worker takes one GPU (dask: worker i -> cuda:i mod n; ray:
each task asks for one GPU and Ray sets CUDA_VISIBLE_DEVICES for it), and `--workers` defaults
to the number of GPUs; on CPU it defaults to 2.

The local cluster listens on 127.0.0.1 only (Dask: scheduler, nannies, workers; Ray: GCS, raylet,
agents, workers): both speak pickle on the wire, so anyone who can connect can run code. A cluster
of the user's own is used instead when its address is given the libraries' usual way:
DASK_SCHEDULER_ADDRESS (dask config `scheduler-address`) or RAY_ADDRESS.
"""

from __future__ import annotations

import contextlib
import os
import sys
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
        import dask.config
        from prefect_dask import DaskTaskRunner

        address = dask.config.get("scheduler-address", None)
        if address:  # the user's own cluster
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                              "host": "127.0.0.1", "dashboard_address": None})
    from prefect_ray import RayTaskRunner

    if os.environ.get("RAY_ADDRESS"):  # the user's own cluster (ray.init reads RAY_ADDRESS)
        return RayTaskRunner(address=os.environ["RAY_ADDRESS"], init_kwargs={"log_to_driver": False})
    ray_loopback_only()
    return RayTaskRunner(init_kwargs={"num_cpus": n, "include_dashboard": False, "log_to_driver": False})


def ray_loopback_only() -> None:
    """Make a local Ray instance bind 127.0.0.1. Ray takes the node's address from the network unless
    "Ray clusters" are disabled, as they are on macOS and Windows: then the node is 127.0.0.1, and
    GCS, raylet, agents and workers listen there. Its switch (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) is
    read when ray is imported: set for the processes Ray starts, and in ray's constants when this
    process imported ray already (prefect_ray does). tests/test_runner.py checks the sockets."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False


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
