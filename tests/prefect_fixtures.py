"""One session-scoped Prefect test harness (a temporary Prefect server on SQLite) for the flow tests."""

from __future__ import annotations

import os
import tempfile

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
