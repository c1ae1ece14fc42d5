"""`vptq db` (schema migrations); `register(app)` also attaches cli/artifacts.py's `vptq artifacts`
and `vptq pull` (the registry) to the main Typer app.

Errors are one line on stderr (cli/errors.py: exit 2 for bad input, 1 for a database failure);
`--debug` shows the traceback.
"""

from __future__ import annotations

import typer
from vptq_service.cli import options as opt
from vptq_service.cli.errors import errors

app = typer.Typer(name="db", help="Lineage database: schema migrations.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.command()
def upgrade(revision: str = typer.Option("head", "--revision", help="Target Alembic revision."),
            debug: opt.Debug = False) -> None:
    """Apply the schema migrations to the database of VPTQ_DB_URL (default: SQLite in VPTQ_HOME)."""
    with errors(debug):
        from vptq_service.store.db import make_engine
        from vptq_service.store.migrate import upgrade_from

        engine = make_engine()
        try:
            before, after = upgrade_from(engine, revision)
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


def register(main_app: typer.Typer) -> None:
    """Attach `db`, `artifacts` and `pull` to the main app."""
    from vptq_service.cli import artifacts

    main_app.add_typer(app, name="db")
    artifacts.register(main_app)
