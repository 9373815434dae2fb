"""Run a command-line tool so that no private record reaches the terminal through an error.

A Python traceback shows source lines and, with rich's pretty tracebacks, every frame's local
variables: a data frame of patient rows among them. Every cityfed console script
(``fl-sim``, ``fl-client``, ``fl-server``, ``fl-pki``) starts through :func:`run_app`:

* an error raised by cityfed's own code (a bad data file, policy, ledger, key, option) is
  printed as its message, which names the file, the field and the fix and never a record;
* any other exception is printed as its type and the place it was raised (file and line),
  without its message (which a library may have filled with a value from the data), and
  with a hint to re-run with ``--debug``;
* ``--debug`` anywhere on the command line shows the full traceback (without local variables).
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from collections.abc import Callable

#: Environment: "1" behaves as if ``--debug`` were given (for tools that start other tools).
DEBUG_ENV = "CITYFED_DEBUG"
#: Packages whose exception messages are written for operators (they never carry record values).
OWN_PACKAGES = ("clients", "server", "privacy", "shared_models", "simulations", "flower_compat", "citydata", "contract",
                "serving")
#: Exit status after an unexpected error.
EXIT_ERROR = 1

#: Columns a console writes when its output is not a terminal (a log, a pipe, systemd's journal)
#: and ``COLUMNS`` is not set: rich's default of 80 split node fingerprints and site names over
#: several lines, which breaks grep and copy-paste.
PIPE_WIDTH = 200


def make_console(stderr: bool = False, **kwargs) -> "Console":
    """A rich console for a CLI's output: no highlighting, soft wrap, :data:`PIPE_WIDTH` columns off a terminal.

    Parameters
    ----------
    stderr : bool
        Write to standard error instead of standard output.
    **kwargs
        Other :class:`rich.console.Console` arguments (they win).

    Returns
    -------
    rich.console.Console
    """
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()) else PIPE_WIDTH
    # emoji=False: rich reads ":CD:" in a fingerprint (AA:CD:EF) as an emoji code and prints a CD emoji
    return Console(**{"stderr": stderr, "highlight": False, "soft_wrap": True, "width": width, "emoji": False, **kwargs})


def _own(exc: BaseException) -> bool:
    return type(exc).__module__.split(".", 1)[0] in OWN_PACKAGES


def describe(exc: BaseException) -> str:
    """One line about ``exc`` that is safe to print: its own message, or only its type and place.

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    str
    """
    if _own(exc):
        return f"{type(exc).__name__}: {exc}"
    os_text = _os_error_text(exc)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    place = ""
    if frames:
        place = f" raised at {_where(frames[-1])}"
        ours = [f for f in frames if any(f"{os.sep}{p}{os.sep}" in f.filename for p in OWN_PACKAGES)]
        if ours and ours[-1] is not frames[-1]:
            place += f", called from {_where(ours[-1])}"
    if os_text:
        return f"{type(exc).__name__}{place}: {os_text}"
    return (f"{type(exc).__module__}.{type(exc).__name__}{place} (its message is not shown: it may contain "
            "values from your records)")


def _os_error_text(exc: BaseException) -> str | None:
    """The operating system's own words for an OSError (its errno, that errno's text, the file), else None.

    Only a text that is exactly ``os.strerror(errno)`` is shown: a library's OSError with a message
    of its own stays hidden.
    """
    import errno as errno_names

    if not isinstance(exc, OSError) or not isinstance(exc.errno, int) or exc.strerror != os.strerror(exc.errno):
        return None
    name = errno_names.errorcode.get(exc.errno, str(exc.errno))
    where = f": {exc.filename}" if isinstance(exc.filename, (str, bytes, os.PathLike)) else ""
    return f"{exc.strerror} ({name}){where}"


def _where(frame: traceback.FrameSummary) -> str:
    return f"{frame.filename}:{frame.lineno} ({frame.name})"


def _plain_warnings(prog: str) -> None:
    """Print each distinct warning once, as ``prog: warning: Category: message``.

    Python's default shows the file, line number and source line of the ``warnings.warn`` call
    (``clients/node.py:91: DataQualityWarning: ... return ds, ds.site_data(self.site)``), and
    once per calling place: a data file's warning appeared twice in ``fl-sim run`` (the
    coordinator's central evaluation and the node load the same file). ``--debug`` keeps
    Python's format.
    """
    import warnings

    seen: set[tuple[str, str]] = set()

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 - warnings' signature
        key = (category.__name__, str(message))
        if key in seen:
            return
        seen.add(key)
        print(f"{prog}: warning: {category.__name__}: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive; so does a reused pid).

    Used to tell the leftovers of a killed writer (named with its pid) from those of a running one.
    """
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def pid_lock(path: str | os.PathLike):
    """Take an exclusive, non-blocking lock on ``path`` and write this process's PID into it.

    One process per state folder (``fl-client``, ``fl-server start``): the lock goes with the
    open file, so a killed process leaves no stale lock.

    Parameters
    ----------
    path : path-like
        The lock file (created if missing; its folder must exist).

    Returns
    -------
    (file, None) or (None, str)
        The open lock file, to keep open while the process runs; or, when another process holds
        the lock, None and that process's PID as written in the file ("?" if unknown).
    """
    import fcntl

    fh = open(path, "a+")  # noqa: SIM115 - the caller holds it
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        return None, holder
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh, None


def restore_argument_help(command) -> None:
    """Give each positional argument of ``command`` (and of its subcommands) its help text back.

    typer (0.20) sets a ``TyperArgument``'s help before ``click.Argument.__init__`` (click >= 8.2)
    resets it to None, so ``--help`` listed ``PUBLIC_KEY``, ``RUN`` or ``PACKAGE`` without the
    ``typer.Argument(help=...)`` description. The help is read back from each command function's
    own declaration; arguments that already have help, and plain click commands, are left alone.

    Parameters
    ----------
    command : click.Command
        A command or group, as ``typer.main.get_command`` builds it.
    """
    import click
    from typer.models import ArgumentInfo
    from typer.utils import get_params_from_function

    for sub in getattr(command, "commands", {}).values():
        restore_argument_help(sub)
    function = getattr(command.callback, "__wrapped__", None)  # typer's wrapper of the command function
    if function is None:
        return
    declared = {name: meta.default for name, meta in get_params_from_function(function).items()}
    for param in command.params:
        info = declared.get(param.name)
        if isinstance(param, click.Argument) and not getattr(param, "help", None) and isinstance(info, ArgumentInfo):
            param.help = info.help


def run_app(app: Callable[..., object], prog: str, argv: list[str] | None = None,
            startup: Callable[[], object] | None = None) -> None:
    """Run a typer/click ``app`` as a console script with record-safe errors (see module docstring).

    Parameters
    ----------
    app : typer.Typer or click command
    prog : str
        Program name for messages (``fl-sim``).
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``); ``--debug`` is taken out of them.
    startup : callable, optional
        Called before the app (e.g. :func:`flower_compat.self_test`), except for ``--help``;
        its errors are reported like the app's (message, exit status 1; traceback only with ``--debug``).
    """
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV) == "1"
    args = [a for a in args if a != "--debug"]
    if debug:
        os.environ[DEBUG_ENV] = "1"
    else:
        _plain_warnings(prog)
    try:
        if startup is not None and not {"--help", "-h"} & set(args):  # help text needs no start-up check
            startup()
        command = app
        if not isinstance(app, click.Command):  # a typer.Typer: build its click command once, help restored
            import typer.main

            command = typer.main.get_command(app)
            restore_argument_help(command)
        code = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:  # typer.Exit
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors: click's own message
        exc.show()
        code = exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the point: nothing escapes as a traceback
        if debug:
            traceback.print_exception(exc)
        else:
            print(f"{prog}: error: {describe(exc)}. Run again with --debug for the traceback.", file=sys.stderr)
        code = EXIT_ERROR
    sys.exit(code if isinstance(code, int) else 0)


def finite_seconds(option: str, example: float, most: float | None = None) -> Callable[[float | None], float | None]:
    """A typer callback refusing NaN, infinity and values over ``most`` for the seconds option ``option``.

    click's ``min=`` lets NaN through, and its ``max=`` refusal names no fix: this callback does both.

    Parameters
    ----------
    option : str
        The option's name, for the message (``--wait-start``).
    example : float
        A good value, for the fix.
    most : float, optional
        The largest value taken (``--backoff 1e300`` would never restart); none by default.

    Returns
    -------
    callable
        ``check(value)``: ``value`` unchanged, or :class:`typer.BadParameter` (exit 2, before the command runs).
    """
    def check(value: float | None) -> float | None:
        if value is None:
            return value
        problem = None
        if not math.isfinite(value):
            problem = f"{value} is not a finite number of seconds (NaN and infinity are refused)"
        elif most is not None and value > most:
            problem = f"{value:g} seconds is more than the {most:g} this option takes"
        if problem:
            import typer

            raise typer.BadParameter(f"{problem}; fix: {option} {example:g}", param_hint=f"'{option}'")
        return value

    return check
