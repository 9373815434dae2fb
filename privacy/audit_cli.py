"""``audit`` sub-commands (typer + rich) for ``fl-server audit`` and ``fl-client audit``.

Built by :func:`make_audit_app` and mounted by each tool with ``app.add_typer(...,
name="audit")``; the tool supplies where its log and public key live by default.

Exit codes: 0 ok, 1 ``verify`` found the log broken, 2 bad input (missing or unreadable
log, key or output file).
"""

# no `from __future__ import annotations`: typer must resolve the option types defined inside
# make_audit_app, which it cannot do from strings
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from contract.text import escape_controls
from contract.text_files import printable
from privacy.safe_cli import make_console
from rich.markup import escape
from rich.table import Table

from privacy import audit

#: Environment switch "1" = ``--debug`` (set by the tools' common launcher when ``--debug`` is given).
DEBUG_ENV = "CITYFED_DEBUG"
#: Characters of an entry's data shown by ``show`` (the whole entry: ``export``).
SUMMARY_CHARS = 100


def _out() -> Console:
    return make_console()


def _err() -> Console:
    return make_console(stderr=True)


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Library errors -> red message + exit 2; anything else too, with the traceback only under --debug."""
    try:
        yield
    except typer.Exit:
        raise
    except audit.AuditError as err:
        _err().print(f"[bold red]error:[/] {escape(str(err))}")
        raise typer.Exit(2) from None
    except Exception as err:  # noqa: BLE001 - an operator tool prints no traceback unless asked
        if debug or os.environ.get(DEBUG_ENV) == "1":
            raise
        _err().print(f"[bold red]error:[/] unexpected {type(err).__name__}: {escape(str(err))} "
                     "(rerun with --debug for the traceback)")
        raise typer.Exit(2) from None


def summarize(data: dict, width: int = SUMMARY_CHARS) -> str:
    """``key=value, ...`` of an entry's data, shortest values first (IDs stay visible), cut to ``width`` characters.

    Control, bidirectional and zero-width characters in keys and values are shown escaped
    (:func:`contract.text.escape_controls`): a log written before node text was cleaned where it
    was received may hold a node's raw terminal sequences.
    """
    parts = []
    for k, v in data.items():
        text = escape_controls(v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False))
        parts.append((len(text), f"{escape_controls(str(k))}={text}"))
    s = ", ".join(p for _, p in sorted(parts, key=lambda p: p[0]))
    return s if len(s) <= width else s[: width - 1] + "…"


def make_audit_app(role: str, default_log: Callable[[], Path],
                   default_pub: Callable[[Path], Path | None]) -> typer.Typer:
    """The ``audit`` command group (``verify``, ``show``, ``export``) for one tool.

    Parameters
    ----------
    role : str
        Whose log it is, for help texts (``"node"`` or ``"coordinator"``).
    default_log : callable
        Returns the log path used when ``--log`` is not given (called lazily, so it can
        read environment variables such as the state dir).
    default_pub : callable
        Called with the log's path; returns the public key checked by ``verify`` when
        ``--pub`` is not given, or None (a returned path that does not exist counts as None:
        ``verify`` then fails unless ``--chain-only`` is given).

    Returns
    -------
    typer.Typer
        Mount it with ``app.add_typer(make_audit_app(...), name="audit")``.
    """
    sub = typer.Typer(
        suggest_commands=False,  # click says "Did you mean ...?" itself (typer repeated it)
        name="audit",
        help=(f"The {role}'s tamper-evident audit log (hash-chained, signed JSON lines).\n\n"
              "[bold]verify[/] checks it (exit 0 intact, 1 broken: the first broken entry is named), "
              "[bold]show[/] lists entries, [bold]export[/] copies it (with its head) for off-host "
              "anchoring. Exit codes: 0 ok, 1 broken, 2 bad input."),
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode="rich",
        pretty_exceptions_show_locals=False,
    )

    def command(name: str):
        def register(fn):
            paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
            return sub.command(name, help="\n\n".join(" ".join(p.split("\n")) for p in paragraphs))(fn)

        return register

    log_help = f"Audit log file (default: the {role}'s <state-dir>/audit.jsonl)."
    LogOpt = Annotated[Optional[Path], typer.Option("--log", help=log_help, show_default=False)]
    DebugOpt = Annotated[bool, typer.Option("--debug", help="Show a Python traceback on unexpected errors.")]

    def resolve_log(log: Path | None) -> Path:
        path = Path(log or default_log()).expanduser()
        where = f"it lives in the state dir the {role} runs with: <state-dir>/audit.jsonl"
        if path.is_dir():
            raise audit.AuditError(f"audit log {path}: is a directory, not the log file; fix: pass --log with the "
                                   f"{role}'s audit.jsonl, e.g. --log {path / 'audit.jsonl'} ({where})")
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise audit.AuditError(f"audit log {path} {what}; fix: pass --log with the {role}'s audit.jsonl ({where})")
        return path

    @command("verify")
    def verify_cmd(
        log: LogOpt = None,
        pub: Annotated[Optional[list[Path]], typer.Option("--pub", help=f"Public key that signed the log (OpenSSH node.pub or PEM audit.pub); default: the {role}'s. Repeat it for a log whose key was replaced (a key-changed entry): the current key and the earlier ones.", show_default=False)] = None,
        anchor: Annotated[Optional[Path], typer.Option("--anchor", help="A copy of <log>.head kept off-host earlier: the log must still contain that entry (detects a rewritten or cut history).")] = None,
        chain_only: Annotated[bool, typer.Option("--chain-only", help="Accept a log whose signatures cannot be checked (no public key): only the hash chain and head file are checked. Anyone who can write the file can rebuild a chain: this proves little.")] = False,
        debug: DebugOpt = False,
    ) -> None:
        """Check the hash chain, every signature and the head file; name the first broken entry.

        Exit 0 when intact, 1 when broken (edited, deleted, reordered or unsigned entry,
        bad signature, cut tail, interrupted write) or when no public key was found to check
        the signatures (pass --pub, or --chain-only to accept a chain-only check).
        """
        pub_name = "node.pub" if role == "node" else "audit.pub"
        with _errors(debug):
            path = resolve_log(log)
            key = list(pub) if pub else None
            if key is None:
                dflt = default_pub(path)
                key = dflt if dflt is not None and Path(dflt).expanduser().is_file() else None
            res = audit.verify(path, public_key_path=key, anchor=anchor)
        if res.ok and (res.signatures_checked or chain_only):
            _out().print(f"[bold green]OK[/] {escape(str(path))}: {escape(res.reason)}")
            if not res.signatures_checked:
                _err().print(f"[yellow]warning:[/] signatures not checked (--chain-only); pass --pub with the public key "
                             f"({pub_name}) to check them")
            elif res.unchecked:
                _err().print(f"[yellow]warning:[/] the signatures of entries signed before a key change were not "
                             f"checked; pass the earlier {pub_name} too (`fl-pki node-key --force` keeps it as "
                             "node-replaced-<time>.pub)" if role == "node" else
                             f"[yellow]warning:[/] the signatures of entries signed before a key change were not "
                             f"checked; pass the earlier {pub_name} too (--pub, repeatable)")
            return
        if res.ok:
            _err().print(f"[bold red]NOT VERIFIED[/] {escape(str(path))}: {escape(res.reason)}; no public key was found "
                         f"to check the signatures (a hash chain alone can be rebuilt by anyone who can write the file); "
                         f"fix: pass --pub with the {role}'s {pub_name}, or --chain-only to accept a chain-only check")
            raise typer.Exit(1)
        _err().print(f"[bold red]BROKEN[/] {escape(str(path))}: {escape(res.reason)}")
        if res.first_bad is not None:
            line = _line(path, res.first_bad)
            if line is not None:
                _err().print(f"first broken entry (line {res.first_bad}): {escape(printable(line))}")
        raise typer.Exit(1)

    @command("show")
    def show_cmd(
        log: LogOpt = None,
        kind: Annotated[list[str], typer.Option("--kind", help="Only entries of this kind (repeatable), e.g. --kind run --kind refused.")] = [],  # noqa: B006
        last: Annotated[Optional[int], typer.Option("--last", min=1, help="Only the last N (matching) entries.")] = None,
        debug: DebugOpt = False,
    ) -> None:
        """List entries: seq, time, kind and a summary of the data (`export` prints whole entries).

        Does not check integrity: run `verify` for that.
        """
        with _errors(debug):
            path = resolve_log(log)
            rows = [e for e in audit.AuditLog(path).entries() if not kind or e.get("kind") in kind]
        if last is not None:
            rows = rows[-last:]
        t = Table(title=f"audit log {path}")
        t.add_column("seq", justify="right", no_wrap=True)
        t.add_column("time (UTC)", no_wrap=True)
        t.add_column("kind", no_wrap=True)
        t.add_column("data", overflow="fold")
        for e in rows:
            data = e.get("data") if isinstance(e.get("data"), dict) else {"?": e.get("data")}
            t.add_row(str(e.get("seq", "?")), escape(str(e.get("time", ""))[:19].replace("T", " ")),
                      escape(str(e.get("kind", ""))), escape(summarize(data)))
        _out().print(t)
        if not rows:
            _err().print("[yellow]no entries[/]" + (f" of kind {', '.join(kind)}" if kind else ""))

    @command("export")
    def export_cmd(
        log: LogOpt = None,
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write here (and the head to <FILE>.head); default: standard output.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
        debug: DebugOpt = False,
    ) -> None:
        """Copy the log's complete entries as JSON lines, byte for byte (so the copy verifies too).

        A log with a line that is not a JSON entry is refused (exit 2), as `show` refuses it:
        `verify` names the broken entry.

        With -o FILE the head goes to FILE.head as well: keep both on another machine and
        later check the live log with `verify --anchor FILE.head`.
        """
        with _errors(debug):
            path = resolve_log(log)
            audit.AuditLog(path).entries()  # a line that is no JSON entry is refused as `show` refuses it
            raw = path.read_bytes()
            body = raw[: raw.rfind(b"\n") + 1]  # complete lines only
            if out is None:
                sys.stdout.buffer.write(body)
                sys.stdout.flush()
                return
            out = Path(out).expanduser()
            if out.exists() and not force:
                raise audit.AuditError(f"--out {out} exists; fix: choose another file or add --force")
            try:
                _write_private(out, body)  # as private as the log (0600)
                head = path.with_name(path.name + audit.HEAD_SUFFIX)
                if head.exists():
                    _write_private(out.with_name(out.name + audit.HEAD_SUFFIX), head.read_bytes())
            except OSError as exc:
                raise audit.AuditError(f"--out {out}: cannot write it ({exc.strerror}); fix: check the folder "
                                       "exists and is writable") from None
        n = body.count(b"\n")
        _err().print(f"[green]exported[/] {n} entr{'y' if n == 1 else 'ies'} to {escape(str(out))}")

    return sub


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 (replacing what is there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file (--force) keeps its mode otherwise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _line(path: Path, n: int, width: int = 300) -> str | None:
    """Line ``n`` (1-based) of ``path``, cut to ``width`` characters; None if there is none."""
    try:
        with open(path, "rb") as fh:
            for i, line in enumerate(fh, 1):
                if i == n:
                    text = line.rstrip(b"\n").decode("utf-8", "replace")
                    return text if len(text) <= width else text[: width - 1] + "…"
    except OSError:
        return None
    return None
