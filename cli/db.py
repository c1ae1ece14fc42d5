"""`vptq db` (schema migrations) and `vptq artifacts` / `vptq pull` (the registry) commands.

Errors are one line on stderr (cli/errors.py: exit 2 for a bad or unknown NAME:VERSION, 1 for a
store or database failure); `--debug` shows the traceback.
`register(app)` attaches these commands to the main Typer app.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from vptq_service.cli import options as opt
from vptq_service.cli.errors import errors
from vptq_service.cli.output import emit

app = typer.Typer(name="db", help="Lineage database: schema migrations.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
artifacts_app = typer.Typer(name="artifacts", help="Artifact registry: list, publish, pull, delete.",
                            no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command()
def upgrade(revision: str = typer.Option("head", "--revision", help="Target Alembic revision."),
            debug: opt.Debug = False) -> None:
    """Apply the schema migrations to the database of VPTQ_DB_URL (default: SQLite in VPTQ_HOME)."""
    with errors(debug):
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
def current(debug: opt.Debug = False) -> None:
    """Show the database URL (password hidden) and its schema revision."""
    with errors(debug):
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
          debug: opt.Debug = False) -> None:
    """Published versions in the artifact store (VPTQ_ARTIFACTS), newest first."""
    with errors(debug):
        from vptq_service.store.registry import Registry, parse_ref

        if name is not None:
            parse_ref(name)
        items = [{"name": m.name, "version": m.version, "ref": f"{m.name}:{m.version}", "size": m.size,
                  "files": len(m.files), "status": m.status, "job_id": m.lineage.get("job_id"),
                  "published_at": m.published_at.isoformat()} for m in Registry.open().list(name)]
        if as_json:
            emit({"items": items}, True, "")
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
            debug: opt.Debug = False) -> None:
    """Upload FOLDER as NAME:VERSION (refused if it exists) and record it in the database."""
    with errors(debug):
        from vptq_service.store.errors import StoreError
        from vptq_service.store.registry import Registry, parse_ref

        name, version = parse_ref(ref)
        if version is None:
            raise StoreError(f"publish needs an explicit version: {ref}:VERSION")
        if not folder.is_dir():
            raise StoreError(f"cannot publish {ref}: {folder} is not a folder")
        m = Registry.open(with_db=True).publish(name, version, folder, job_id=job_id)
        typer.echo(f"published {m.name}:{m.version}: {len(m.files)} files, {m.size} bytes")


def pull(ref: str = typer.Argument(..., help="NAME or NAME:VERSION (newest accepted version when omitted)."),
         dest: Optional[Path] = typer.Argument(None, help="Folder to create (default: ./NAME-VERSION)."),
         as_json: bool = typer.Option(False, "--json", help='Print {"path", "files", "verified"} on stdout.'),
         debug: opt.Debug = False) -> None:
    """Download an artifact, verify every sha256, and create DEST only when all files check out."""
    with errors(debug):
        from vptq_service.store.registry import Registry, parse_ref

        parse_ref(ref)  # bad input is reported before any store is contacted
        registry = Registry.open()
        if dest is None:
            m = registry.resolve(ref)
            ref, dest = f"{m.name}:{m.version}", Path(f"{m.name}-{m.version}")
        r = registry.pull(ref, dest)
        emit({"path": str(Path(r.dest).absolute()), "files": r.files, "verified": True,
              "artifact": f"{r.name}:{r.version}", "downloaded": r.downloaded, "reused": r.reused, "size": r.size},
             as_json, f"pulled {r.name}:{r.version} into {r.dest}: {r.files} files verified "
                      f"({r.downloaded} downloaded, {r.reused} already present)")


artifacts_app.command("pull")(pull)


@artifacts_app.command()
def delete(ref: str = typer.Argument(..., help="NAME:VERSION to delete."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
           debug: opt.Debug = False) -> None:
    """Delete one published version from the store and the database (asks first)."""
    with errors(debug):
        from vptq_service.store.errors import StoreError
        from vptq_service.store.registry import Registry, parse_ref

        name, version = parse_ref(ref)
        if version is None:
            raise StoreError(f"delete needs an explicit version: {ref}:VERSION")
        if not yes:
            if not sys.stdin.isatty():
                raise StoreError(f"refusing to delete {name}:{version} without confirmation: pass --yes")
            typer.confirm(f"delete {name}:{version} permanently?", abort=True)
        n = Registry.open(with_db=True).delete(name, version)
        typer.echo(f"deleted {name}:{version} ({n} objects)")


def register(main_app: typer.Typer) -> None:
    """Attach `db`, `artifacts` and `pull` to the main app."""
    main_app.add_typer(app, name="db")
    main_app.add_typer(artifacts_app, name="artifacts")
    main_app.command("pull")(pull)
