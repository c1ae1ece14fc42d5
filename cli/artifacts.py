"""`vptq artifacts` (ls, publish, pull, delete, gc, fsck) and `vptq pull`: the artifact registry.

Errors are one line on stderr (cli/errors.py: exit 2 for a bad or unknown NAME:VERSION or a
version someone else holds, 1 for a store or database failure); `--debug` shows the traceback.
"""

from __future__ import annotations

import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import typer
from vptq_service.cli import options as opt
from vptq_service.cli.errors import errors
from vptq_service.cli.output import emit

artifacts_app = typer.Typer(name="artifacts", help="Artifact registry: list, publish, pull, delete, gc, fsck.",
                            no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_grace(text: str) -> timedelta:
    """'1h', '30m', '90s', '2d' or plain seconds -> timedelta; a usage error (exit 2) otherwise."""
    from vptq_service.store.errors import StoreUsageError

    m = _DURATION.match(text)
    if not m:
        raise StoreUsageError(f"--grace {text!r} is not a duration: use e.g. 1h, 30m, 90s, 0")
    return timedelta(seconds=float(m[1]) * _UNIT[m[2]])


Grace = typer.Option("1h", "--grace", help="Leave objects younger than this alone (1h, 30m, 90s, 0).")


@artifacts_app.command("ls")
def list_(name: Optional[str] = typer.Argument(None, help="Only this artifact name."),
          as_json: bool = typer.Option(False, "--json", help='Print {"items": [...]} on stdout (and "skipped": unreadable versions).'),
          debug: opt.Debug = False) -> None:
    """Published versions in the artifact store (VPTQ_ARTIFACTS), newest first.

    A version whose manifest this vptq cannot read (a newer format) is skipped with a warning."""
    with errors(debug):
        from vptq_service.store.registry import Registry, parse_ref

        if name is not None:
            parse_ref(name)
        found = Registry.open().listing(name)
        for line in found.skipped:
            typer.echo(f"warning: {line}", err=True)
        items = [{"name": m.name, "version": m.version, "ref": f"{m.name}:{m.version}", "size": m.size,
                  "files": len(m.files), "status": m.status, "job_id": m.lineage.get("job_id"),
                  "published_at": m.published_at.isoformat()} for m in found.manifests]
        if as_json:
            emit({"items": items, **({"skipped": found.skipped} if found.skipped else {})}, True, "")
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
    """Upload FOLDER as NAME:VERSION (refused if it exists or another publisher holds it) and record it."""
    with errors(debug):
        from vptq_service.store.errors import StoreUsageError
        from vptq_service.store.registry import Registry, parse_ref

        name, version = parse_ref(ref)
        if version is None:
            raise StoreUsageError(f"publish needs an explicit version: {ref}:VERSION")
        if not folder.is_dir():
            raise StoreUsageError(f"cannot publish {ref}: {folder} is not a folder")
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
    """Delete one version from the store and the database (asks first); also a row whose files are gone."""
    with errors(debug):
        from vptq_service.store.errors import StoreError, StoreUsageError
        from vptq_service.store.registry import Registry, parse_ref

        name, version = parse_ref(ref)
        if version is None:
            raise StoreUsageError(f"delete needs an explicit version: {ref}:VERSION")
        if not yes:
            if not sys.stdin.isatty():
                raise StoreError(f"refusing to delete {name}:{version} without confirmation: pass --yes")
            typer.confirm(f"delete {name}:{version} permanently?", abort=True)
        n = Registry.open(with_db=True).delete(name, version)
        typer.echo(f"deleted {name}:{version} ({n} objects)")


@artifacts_app.command()
def gc(grace: str = Grace,
       dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would be removed."),
       as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
       debug: opt.Debug = False) -> None:
    """Remove orphaned uploads (of killed or losing publishers) older than --grace from the store."""
    with errors(debug):
        from vptq_service.store.registry import Registry
        from vptq_service.store.upkeep import gc as run_gc

        age = parse_grace(grace)
        registry = Registry.open(with_db=True)
        report = run_gc(registry.store, registry.repo, grace=age, dry_run=dry_run).to_dict()
        verb = "would remove" if dry_run else "removed"
        emit(report, as_json, f"{verb} {report['objects']} orphaned objects ({report['bytes']} bytes) in "
                              f"{len(report['removed'])} groups; {report['kept_recent']} younger than {grace} kept")


@artifacts_app.command()
def fsck(repair: bool = typer.Option(False, "--repair", help="Fix what is found (see --help)."),
         grace: str = Grace,
         as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
         debug: opt.Debug = False) -> None:
    """Compare the store with the database; with --repair make them agree.

    A manifest without a row gets its row; a row whose manifest is gone, or a version whose files
    are missing, is removed; a reservation of a gone publisher (dead, or older than --grace) is
    finalized when its manifest was committed, else removed with its staged files; orphaned uploads
    older than --grace are removed. Exit 1 when drift is left (without --repair: when any is found)."""
    with errors(debug):
        from vptq_service.store.registry import Registry
        from vptq_service.store.upkeep import fsck as run_fsck

        age = parse_grace(grace)
        registry = Registry.open(with_db=True)
        report = run_fsck(registry.store, registry.repo, repair=repair, grace=age)
        data = report.to_dict()
        lines = [f"{'repaired' if f.repaired else 'found'} {f.kind} {f.ref}: {f.detail}" for f in report.findings]
        orphans = data["orphans"]
        if orphans["removed"]:
            lines.append(f"{'would remove' if orphans['dry_run'] else 'removed'} {orphans['objects']} orphaned "
                         f"objects ({orphans['bytes']} bytes)")
        lines += [f"in flight: {r}" for r in report.in_flight]
        emit(data, as_json, "\n".join(lines) if lines else "store and database agree")
        if not report.clean:
            if not as_json and not repair:
                typer.echo("error: drift found: `vptq artifacts fsck --repair` fixes it", err=True)
            raise typer.Exit(1)


def register(main_app: typer.Typer) -> None:
    """Attach `artifacts` and `pull` to the main app."""
    main_app.add_typer(artifacts_app, name="artifacts")
    main_app.command("pull")(pull)
