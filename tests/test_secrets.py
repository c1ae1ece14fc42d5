"""Secrets never printed, logged or stored (issue 26, item 4).

Secrets are planted where a user puts them -- a database password with `/`, `:` and `@` in it, a
`?password=` query parameter, S3 keys in a model source URL, AWS_SECRET_ACCESS_KEY -- and the real
commands run against real PostgreSQL and S3 (moto over HTTP). Then the outputs (stdout, stderr,
--json), the log records and every row of the database are searched for the secret strings.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from typer.testing import CliRunner
from vptq_service.store.errors import mask_text, mask_url

from tests.store_fixtures import S3_SECRET, bucket, db_url, s3_client, s3_env  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TINY = ["--nsamples", "2", "--seqlen", "64", "--eval-windows", "1", "--eval-seqlen", "64",
        "--set", "vector_len=4", "--set", "num_centroids=16", "--set", "kmeans_iters=3",
        "--set", "refine_iters=0", "--set", "e2e_steps=0", "--json"]

# a password with the characters that broke the old masking; the hex core is what the tests search for
CORE = uuid.uuid4().hex
PASSWORD = f"pw/{CORE}:x@y"
QUERY_SECRET = f"qs{uuid.uuid4().hex}"


@pytest.mark.parametrize("raw, shown", [
    ("postgresql+psycopg://u:p%40ss@h/db", "postgresql+psycopg://u:***@h/db"),
    ("postgresql://u:pa/ss:w@rd@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u@h/db?password=hunter2&options=-csearch_path%3Dx",
     "postgresql://u@h/db?password=***&options=-csearch_path%3Dx"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc&X-Amz-Security-Token=t",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://bob:tok3n@example.com/m?access_token=t&api_key=k", "https://bob:***@example.com/m?access_token=***&api_key=***"),
    ("s3://AKIA:se/cr+et@bucket/prefix", "s3://AKIA:***@bucket/prefix"),
    ("hf://org/name@main", "hf://org/name@main"),  # a revision, not a password
    ("http://127.0.0.1:4200/api", "http://127.0.0.1:4200/api"),
    ("sqlite:////home/me/vptq.db", "sqlite:////home/me/vptq.db"),
])
def test_one_masking_rule_for_urls(raw, shown):
    assert mask_url(raw) == shown
    assert mask_text(f"cannot reach '{raw}': refused") == f"cannot reach '{shown}': refused"
    assert mask_text("host=h password=hunter2 dbname=d") == "host=h password=*** dbname=d"
    assert mask_text("64 windows=4 tokens=2048") == "64 windows=4 tokens=2048"  # not a secret


def run(*args) -> tuple[int, str, str]:
    from vptq_service.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def vptq(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The real command in a real process."""
    return subprocess.run([sys.executable, "-m", "vptq_service.cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})


@pytest.fixture
def clean_env(monkeypatch):
    """No settings of the caller's; the variables the CLI sets for its process dropped after."""
    for k in ("VPTQ_DB_URL", "VPTQ_ARTIFACTS", "PREFECT_API_URL"):
        monkeypatch.delenv(k, raising=False)
    saved = dict(os.environ)
    yield monkeypatch
    for k in set(os.environ) - set(saved):
        os.environ.pop(k, None)


def planted(url: str, password: str | None = None, query: str | None = None) -> str:
    """url with a password in its userinfo (percent-encoded only where it must be) or a query parameter."""
    scheme, _, rest = url.partition("://")
    user, _, host = rest.partition("@")
    if password is not None:
        rest = f"{user}:{quote(password, safe='/:')}@{host}"
    out = f"{scheme}://{rest}"
    return out + (f"{'&' if '?' in out else '?'}password={query}" if query else "")


def leaked(text: str) -> list[str]:
    return [s for s in (CORE, QUERY_SECRET, S3_SECRET) if s in text]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("where", ["userinfo", "query"])
def test_database_password_never_printed(db_url, where, tmp_path, clean_env):  # noqa: F811
    url = planted(db_url, password=PASSWORD) if where == "userinfo" else planted(db_url, query=QUERY_SECRET)
    clean_env.setenv("VPTQ_HOME", str(tmp_path / "home"))
    clean_env.setenv("VPTQ_DB_URL", url)
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    outputs = []
    for args in (["db", "upgrade"], ["db", "current"], ["config", "show"], ["config", "show", "--json"],
                 ["jobs", "ls", "--json"]):
        code, out, err = run(*args)
        assert code == 0, (args, err)
        outputs.append(out + err)
    assert "up to date" in outputs[1]
    shown = json.loads(outputs[3])["database"]
    assert "***" in shown and "127.0.0.1:5432/test" in shown
    # the connection error of the same URL on a port nobody listens on, in a real process
    r = vptq("jobs", "ls", env={"VPTQ_DB_URL": url.replace("127.0.0.1:5432", "127.0.0.1:1")})
    assert r.returncode == 1 and "cannot reach database" in r.stderr and "Traceback" not in r.stderr
    outputs.append(r.stdout + r.stderr)
    assert leaked("\n".join(outputs)) == []


@pytest.mark.parametrize("source", [
    f"s3://AKIAEXAMPLE:{S3_SECRET}@bucket/models/tiny",
    f"s3://AKIAEXAMPLE:{S3_SECRET}@bucket",
    f"hf://user:{S3_SECRET}@org/name",
    f"https://user:{S3_SECRET}@example.com/models/tiny",
    f"s3://bucket/models/tiny?X-Amz-Signature={S3_SECRET}",
], ids=["s3-userinfo-prefix", "s3-userinfo", "hf-userinfo", "https-userinfo", "s3-signed-query"])  # stable ids: the
# secret is random per process, and pytest-xdist's workers must collect the same test names
def test_credentials_in_a_source_url_are_refused_before_a_job(source, tmp_path, clean_env):
    clean_env.setenv("VPTQ_HOME", str(tmp_path / "home"))
    for cmd in ("compress", "submit"):
        code, out, err = run(cmd, source, "--name", "x")
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "AWS_" in lines[0], err
        assert S3_SECRET not in out + err
    code, out, err = run("jobs", "ls", "--json")
    assert json.loads(out) == {"items": []}


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_job_with_planted_secrets_leaves_none_behind(db_url, bucket, tiny_llama_dir, text_file, tmp_path,  # noqa: F811
                                                       clean_env, caplog, prefect_harness):
    """A whole job on PostgreSQL (password with odd characters) and S3 (the secret key in AWS_*): the
    database rows, the job's --json, its Prefect log lines and the process's log records hold no secret."""
    from sqlalchemy import create_engine, inspect, text

    clean_env.setenv("VPTQ_HOME", str(tmp_path / "home"))
    clean_env.setenv("VPTQ_DB_URL", planted(db_url, password=PASSWORD))
    caplog.set_level(logging.DEBUG)
    client = s3_client()
    for f in tiny_llama_dir.iterdir():
        client.upload_file(str(f), bucket, f"sources/tiny/{f.name}")
    code, out, err = run("db", "upgrade")
    assert code == 0, err
    outputs = [out, err]
    code, out, err = run("submit", f"s3://{bucket}/sources/tiny", "--name", "tiny", "--calib", text_file,
                         "--local", *TINY)
    assert code == 0, err
    job_id = json.loads(out)["job_id"]
    outputs += [out, err]
    for args in (["jobs", "show", job_id, "--json"], ["jobs", "logs", job_id, "--json"], ["jobs", "ls", "--json"],
                 ["artifacts", "ls", "--json"], ["config", "show", "--json"]):
        code, out, err = run(*args)
        assert code == 0, (args, err)
        assert args[1] != "logs" or json.loads(out)["items"], "the job's log lines were read"
        outputs += [out, err]
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            dump = "\n".join(repr(conn.execute(text(f'SELECT * FROM "{t}"')).all())
                             for t in inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert "tiny" in dump
    assert leaked(dump) == [] and leaked("\n".join(outputs)) == [] and leaked(caplog.text) == []
