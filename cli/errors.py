"""The CLI's one error mapper: every command's failure is one line on stderr and an exit code.

Exit codes (README, "Errors and exit codes"): 2 bad input (ConfigError, SourceError, an existing
--out, a StoreUsageError such as an unknown NAME:VERSION or job id, a usage error of the command
line), 1 failure (any other error: the job, the database, the artifact store), 130 Ctrl-C, 143
SIGTERM. `--debug` re-raises, so the traceback shows. No other cli module imports this one's
callers: it imports nothing of cli/.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click; older ones use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the typer version
    from click import exceptions as click_exceptions

NO_ARGS_IS_HELP = getattr(click_exceptions, "NoArgsIsHelpError", ())  # click >= 8.2

EXIT_USAGE = 2  # bad input: the message says what to change
EXIT_FAILURE = 1  # the job itself failed
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (temporary folders) runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def fail(msg: str, code: int) -> NoReturn:
    """Print `error: msg` as one line on stderr and exit with code."""
    typer.echo("error: " + " ".join(msg.split()), err=True)  # always one line
    raise typer.Exit(code)


def quiet_libraries() -> None:
    """No tqdm/hub bars on a stderr that is not a terminal (logs, pipes); set before tqdm is imported."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from a CLI
    # Prefect waits 20 s for its ephemeral API server; a cold first start (fresh install: bytecode
    # compiled, database migrated) on 2 busy cores can take longer and failed a job before it began
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


# errno of an OSError -> (what it means for the user, exit code): a path the user gave that cannot
# be used is bad input (2); a full disk, a file-size limit or an I/O error is a failure (1)
_OS_ERRORS = {
    errno.ENOTDIR: ("a part of the path is a file, not a folder", EXIT_USAGE),
    errno.EISDIR: ("it is a folder, a file was expected", EXIT_USAGE),
    errno.ENOENT: ("no such file or folder", EXIT_USAGE),
    errno.EACCES: ("permission denied", EXIT_USAGE),
    errno.EPERM: ("operation not permitted", EXIT_USAGE),
    errno.EROFS: ("read-only file system", EXIT_USAGE),
    errno.ENAMETOOLONG: ("file name too long", EXIT_USAGE),
    errno.ELOOP: ("too many symbolic links", EXIT_USAGE),
    errno.EXDEV: ("cannot move across file systems", EXIT_USAGE),
    errno.ENOSPC: ("no space left on the device: free some space or point VPTQ_HOME/the destination elsewhere",
                   EXIT_FAILURE),
    errno.EDQUOT: ("disk quota exceeded: free some space or point VPTQ_HOME/the destination elsewhere", EXIT_FAILURE),
    errno.EFBIG: ("file too large for this process or file system (a `ulimit -f` limit?)", EXIT_FAILURE),
    errno.EIO: ("input/output error on the device", EXIT_FAILURE),
    errno.EMFILE: ("too many open files (raise `ulimit -n`)", EXIT_FAILURE),
    errno.ENOMEM: ("out of memory", EXIT_FAILURE),
}


def one_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def os_error(e: OSError) -> tuple[str, int]:
    """One line and an exit code for an OSError (a path under a file or /proc, a full disk, ...)."""
    what, code = _OS_ERRORS.get(e.errno, (e.strerror or type(e).__name__, EXIT_FAILURE))
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    return (f"{where}: {what}" if where else f"{what} ({type(e).__name__})"), code


def hint(e: BaseException) -> str:
    """What to do about an error that comes from the environment rather than the request."""
    if isinstance(e, ImportError) and (e.name == "kernels" or "from 'kernels'" in str(e)):
        # transformers >= 5.25 imports Hugging Face's `kernels` when it is installed; a different
        # top-level `kernels` found first (an old vptq-service install had one, or a kernels.py in the
        # folder a script runs from) breaks that import
        return (" -- a top-level `kernels` that is not Hugging Face's shadows the one transformers imports"
                " (an older vptq-service install, or a kernels.py beside the script): remove it, e.g."
                " `pip uninstall kernels vptq-service` and reinstall both, or install vptq-service in its own"
                " environment")
    return ""


@contextmanager
def errors(debug: bool):
    """Map exceptions to one-line messages and exit codes (2 usage, 1 failure, 130, 143)."""
    quiet_libraries()
    from vptq_service.store.errors import StoreError, StoreUsageError, mask_text

    from vptq.config import ConfigError
    from vptq.errors import SourceError  # not vptq.source: that imports torch (2 s) in every command

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a worker): keep the default
        pass
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing half-written is left behind", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Terminated:
        typer.echo("terminated: nothing half-written is left behind", err=True)
        raise typer.Exit(EXIT_TERMINATED) from None
    except (ConfigError, SourceError, FileExistsError) as e:
        if debug:
            raise
        fail(str(e), EXIT_USAGE)
    except StoreError as e:  # the database or artifact store: its message says what to fix
        if debug:
            raise
        fail(str(e), EXIT_USAGE if isinstance(e, StoreUsageError) else EXIT_FAILURE)
    except MemoryError:
        if debug:
            raise
        fail("out of memory: use smaller inputs (--nsamples, --seqlen, a shorter text) or a machine with more "
             "memory (`vptq plan` estimates the need)", EXIT_FAILURE)
    except OSError as e:
        if debug:
            raise
        if e.errno is None:  # a library's own OSError("...") carries its message, not an errno
            fail(mask_text(f"{type(e).__name__}: {one_line(e)}"), EXIT_FAILURE)
        msg, code = os_error(e)  # a file-system failure outside the store: what and where, one line
        fail(mask_text(msg), code)
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, no traceback
        if debug:
            raise
        fail(mask_text(f"{type(e).__name__}: {one_line(e)}{hint(e)} (run with --debug for the traceback)"), EXIT_FAILURE)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class OneLineErrors(TyperGroup):
    """Usage errors (missing option, bad value) as one line on stderr, not a rich panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NO_ARGS_IS_HELP as e:  # bare `vptq`: the help, as typer prints it
            e.show()
            code = EXIT_USAGE
        except click_exceptions.UsageError as e:
            where = e.ctx.command_path if e.ctx else "vptq"
            msg = " ".join(e.format_message().split())
            typer.echo(f"error: {msg} (see '{where} --help')", err=True)
            code = EXIT_USAGE
        except click_exceptions.ClickException as e:
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            code = e.exit_code
        except typer.Abort:
            typer.echo("interrupted", err=True)
            code = EXIT_INTERRUPTED
        else:
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code
