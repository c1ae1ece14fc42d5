"""One session-scoped Prefect test harness (a temporary Prefect server on SQLite) for the flow tests,
and one uninterrupted reference job on it that several flow and runner tests compare their bytes with."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """PREFECT_HOME in a temporary folder and one `prefect_test_harness()` for the whole session."""
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    home = tempfile.mkdtemp(prefix="prefect-home-")
    os.environ["PREFECT_HOME"] = home
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield home
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_flow_job(prefect_harness, tiny_llama_dir, text_file, tmp_path_factory):
    """The tiny Llama through the `compress` flow with tests.test_flow.TINY (the preset's Hessian mode,
    original; the local runner), uninterrupted, in a VPTQ_HOME of its own that no test writes to.

    It is the run that the resume and SIGKILL tests (test_flow) and the dask/ray tests (test_runner)
    compare their bytes with; each of them used to compute the same job again. Read only:
    `summary` (the submit's JSON), `checkpoint` (the workspace checkpoint's files, as bytes) and
    `artifact` (the folder the published tiny:v1 was pulled to).
    """
    from tests.test_flow import TINY, checkpoint_bytes, run

    root = tmp_path_factory.mktemp("tiny-flow-job")
    saved = dict(os.environ)
    try:
        for k in ("VPTQ_DB_URL", "VPTQ_ARTIFACTS", "PREFECT_API_URL"):
            os.environ.pop(k, None)
        os.environ["VPTQ_HOME"] = str(root / "home")
        code, out, err = run("submit", tiny_llama_dir, "--name", "tiny", "--calib", text_file, *TINY)
        assert code == 0, err
        summary = json.loads(out)
        assert summary["status"] == "succeeded" and summary["blocks_reused"] == 0, summary
        from vptq_service.store.registry import Registry

        artifact = root / "artifact"
        Registry.open().pull(summary["artifact"], artifact)
        checkpoint = checkpoint_bytes(Path(summary["workspace"]) / "checkpoint")
    finally:  # the CLI sets TQDM_DISABLE & co. for its process: keep them out of the other tests
        os.environ.clear()
        os.environ.update(saved)
    return SimpleNamespace(summary=summary, checkpoint=checkpoint, artifact=artifact)
