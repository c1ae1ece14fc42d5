"""`vptq config show`: the effective settings of this process, secrets masked.

Where each value comes from is shown next to it (env variable or default), so a user can see
why a job wrote where it did. `register(app)` attaches the `config` group to the main app.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Any

import typer
from vptq_service.cli import options as opt
from vptq_service.cli.errors import errors
from vptq_service.cli.output import emit

config_app = typer.Typer(name="config", help="Effective settings (environment and defaults).",
                         no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# environment variables worth showing; values of those in SECRETS are never printed
SHOWN = ("VPTQ_HOME", "VPTQ_DB_URL", "VPTQ_ARTIFACTS", "PREFECT_API_URL", "PREFECT_HOME", "AWS_ENDPOINT_URL",
         "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "HF_ENDPOINT", "HF_TOKEN",
         "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES", "NUMBA_ENABLE_CUDASIM",
         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
         # job liveness (flows/heartbeat.py) and the user's own Dask/Ray cluster (tasks/runner.py)
         "VPTQ_HEARTBEAT_SECONDS", "VPTQ_HEARTBEAT_TIMEOUT", "DASK_SCHEDULER_ADDRESS", "RAY_ADDRESS",
         # Prefect's result defaults: shown, but our flows persist nothing and never pickle (flows/compress.py)
         "PREFECT_RESULTS_DEFAULT_SERIALIZER", "PREFECT_RESULTS_PERSIST_BY_DEFAULT",
         "PREFECT_TASKS_DEFAULT_PERSIST_RESULT")
SECRETS = ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "AWS_SESSION_TOKEN")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def effective() -> dict[str, Any]:
    """The settings as the commands would resolve them now (nothing is created but VPTQ_HOME)."""
    from vptq_service.store.artifacts import open_artifact_store
    from vptq_service.store.db import db_url, vptq_home
    from vptq_service.store.errors import mask_url

    from vptq.pipeline import default_calibration_text

    home = vptq_home()
    env = {k: ("***" if k in SECRETS else mask_url(v)) for k in SHOWN if (v := os.environ.get(k))}
    api = os.environ.get("PREFECT_API_URL")
    return {
        "home": str(home),
        "home_from": "VPTQ_HOME" if os.environ.get("VPTQ_HOME") else "default (per-user data dir)",
        "database": mask_url(db_url()),
        "database_from": "VPTQ_DB_URL" if os.environ.get("VPTQ_DB_URL") else "default (SQLite in VPTQ_HOME)",
        "artifacts": open_artifact_store().uri,
        "artifacts_from": "VPTQ_ARTIFACTS" if os.environ.get("VPTQ_ARTIFACTS") else "default (VPTQ_HOME/artifacts)",
        "workspace": str(home / "work"),
        "cache": str(home / "cache"),
        "prefect_api": mask_url(api) if api else None,
        "prefect_mode": "server (submit queues for a worker)" if api else "ephemeral (jobs run in-process)",
        "calibration_default": str(default_calibration_text()),
        "python": sys.version.split()[0],
        "versions": {d: _version(d) for d in ("vptq-service", "torch", "transformers", "prefect", "sqlalchemy",
                                              "boto3", "numba")},
        "env": env,
    }


@config_app.command("show")
def show(as_json: opt.Json = False, debug: opt.Debug = False) -> None:
    """Effective settings: VPTQ_HOME, database, artifact store, Prefect API, versions (secrets masked)."""
    with errors(debug):
        s = effective()
        lines = [f"home        {s['home']}  [{s['home_from']}]",
                 f"database    {s['database']}  [{s['database_from']}]",
                 f"artifacts   {s['artifacts']}  [{s['artifacts_from']}]",
                 f"workspace   {s['workspace']}",
                 f"prefect     {s['prefect_api'] or '-'}  [{s['prefect_mode']}]",
                 f"calibration {s['calibration_default']}",
                 "versions    " + ", ".join(f"{k} {v}" for k, v in s["versions"].items() if v)]
        lines += [f"env         {k}={v}" for k, v in s["env"].items()]
        emit(s, as_json, "\n".join(lines))


def register(main_app: typer.Typer) -> None:
    """Attach `config show` to the main app."""
    main_app.add_typer(config_app, name="config")
