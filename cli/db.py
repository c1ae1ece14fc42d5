"""`vptq db` (schema migrations) and `vptq artifacts` / `vptq pull` (the registry) commands.

Every StoreError becomes one line on stderr and exit 1, without a traceback (`--debug` shows it).
`register(app)` attaches these commands to the main Typer app.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(name="db", help="Lineage database: schema migrations.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
artifacts_app = typer.Typer(name="artifacts", help="Artifact registry: list, publish, pull, delete.",
                            no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@contextmanager
def _store_errors(debug: bool = False):
    """StoreError -> one line, exit 1 (2 when the request itself is wrong: a bad or unknown
    NAME:VERSION); Ctrl-C -> exit 130 (a pull leaves dest untouched)."""
    from vptq_service.store.errors import StoreError, StoreUsageError

    try:
        yield
    except StoreError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2 if isinstance(e, StoreUsageError) else 1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _registry(with_db: bool):
    from vptq_service.store.artifacts import open_artifact_store
    from vptq_service.store.registry import Registry

    store = open_artifact_store()
    store.check()
    repo = None
    if with_db:
        from vptq_service.store.repository import Repository

        repo = Repository.open()
    return Registry(store, repo)


@app.command()
def upgrade(revision: str = typer.Option("head", "--revision", help="Target Alembic revision."),
            debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Apply the schema migrations to the database of VPTQ_DB_URL (default: SQLite in VPTQ_HOME)."""
    with _store_errors(debug):
        from vptq_service.store.db import make_engine
        from vptq_service.store.migrate import current_revision
        from vptq_service.store.migrate import upgrade as run_upgrade

        engine = make_engine()
        try:
            before = current_revision(engine)
            after = run_upgrade(engine, revision)
        finally:
            engine.dispose()
        shown = engine.url.render_as_string()
        typer.echo(f"{shown}: already at {after}" if before == after else f"{shown}: {before or 'empty'} -> {after}")


@app.command()
def current(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Show the database URL (password hidden) and its schema revision."""
    with _store_errors(debug):
        from vptq_service.store.db import make_engine
        from vptq_service.store.migrate import current_revision, head_revision

        engine = make_engine()
        try:
            rev = current_revision(engine)
        finally:
            engine.dispose()
        head = head_revision()
        state = "up to date" if rev == head else f"behind (code expects {head}: run `vptq db upgrade`)"
        typer.echo(f"{engine.url.render_as_string()}: revision {rev or 'none'}, {state}")


@artifacts_app.command("ls")
def list_(name: Optional[str] = typer.Argument(None, help="Only this artifact name."),
          as_json: bool = typer.Option(False, "--json", help='Print {"items": [...]} on stdout.'),
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Published versions in the artifact store (VPTQ_ARTIFACTS), newest first."""
    with _store_errors(debug):
        from vptq_service.store.registry import parse_ref

        if name is not None:
            parse_ref(name)
        items = [{"name": m.name, "version": m.version, "ref": f"{m.name}:{m.version}", "size": m.size,
                  "files": len(m.files), "status": m.status, "job_id": m.lineage.get("job_id"),
                  "published_at": m.published_at.isoformat()} for m in _registry(with_db=False).list(name)]
        if as_json:
            sys.stdout.write(json.dumps({"items": items}) + "\n")
        elif not items:
            typer.echo("no artifacts yet: `vptq compress smollm2 --bits 2` publishes one")
        for it in [] if as_json else items:
            flag = "  (rejected)" if it["status"] == "rejected" else ""
            typer.echo(f"{it['ref']}\t{it['size']} bytes\t{it['files']} files\t{it['published_at'][:16]}Z{flag}")


artifacts_app.command("list", hidden=True)(list_)  # the longer spelling, kept working


@artifacts_app.command()
def publish(ref: str = typer.Argument(..., help="NAME:VERSION to publish as."),
            folder: Path = typer.Argument(..., help="Folder to upload."),
            job_id: Optional[int] = typer.Option(None, "--job-id", help="Job that produced it (lineage)."),
            debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Upload FOLDER as NAME:VERSION (refused if it exists) and record it in the database."""
    with _store_errors(debug):
        from vptq_service.store.errors import StoreError
        from vptq_service.store.registry import parse_ref

        name, version = parse_ref(ref)
        if version is None:
            raise StoreError(f"publish needs an explicit version: {ref}:VERSION")
        if not folder.is_dir():
            raise StoreError(f"cannot publish {ref}: {folder} is not a folder")
        m = _registry(with_db=True).publish(name, version, folder, job_id=job_id)
        typer.echo(f"published {m.name}:{m.version}: {len(m.files)} files, {m.size} bytes")


def pull(ref: str = typer.Argument(..., help="NAME or NAME:VERSION (newest accepted version when omitted)."),
         dest: Optional[Path] = typer.Argument(None, help="Folder to create (default: ./NAME-VERSION)."),
         as_json: bool = typer.Option(False, "--json", help='Print {"path", "files", "verified"} on stdout.'),
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Download an artifact, verify every sha256, and create DEST only when all files check out."""
    with _store_errors(debug):
        from vptq_service.store.registry import parse_ref

        parse_ref(ref)  # bad input is reported before any store is contacted
        registry = _registry(with_db=False)
        if dest is None:
            m = registry.resolve(ref)
            ref, dest = f"{m.name}:{m.version}", Path(f"{m.name}-{m.version}")
        r = registry.pull(ref, dest)
        if as_json:
            sys.stdout.write(json.dumps({"path": str(Path(r.dest).absolute()), "files": r.files, "verified": True,
                                         "artifact": f"{r.name}:{r.version}", "downloaded": r.downloaded,
                                         "reused": r.reused, "size": r.size}) + "\n")
        else:
            typer.echo(f"pulled {r.name}:{r.version} into {r.dest}: {r.files} files verified "
                       f"({r.downloaded} downloaded, {r.reused} already present)")


artifacts_app.command("pull")(pull)


@artifacts_app.command()
def delete(ref: str = typer.Argument(..., help="NAME:VERSION to delete."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
           debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Delete one published version from the store and the database (asks first)."""
    with _store_errors(debug):
        from vptq_service.store.errors import StoreError
        from vptq_service.store.registry import parse_ref

        name, version = parse_ref(ref)
        if version is None:
            raise StoreError(f"delete needs an explicit version: {ref}:VERSION")
        if not yes:
            if not sys.stdin.isatty():
                raise StoreError(f"refusing to delete {name}:{version} without confirmation: pass --yes")
            typer.confirm(f"delete {name}:{version} permanently?", abort=True)
        n = _registry(with_db=True).delete(name, version)
        typer.echo(f"deleted {name}:{version} ({n} objects)")


def register(main_app: typer.Typer) -> None:
    """Attach `db`, `artifacts` and `pull` to the main app."""
    main_app.add_typer(app, name="db")
    main_app.add_typer(artifacts_app, name="artifacts")
    main_app.command("pull")(pull)
