"""Seam ``logging``: Flower's logger internals (``flwr.supercore.logger``, ``flwr.common.logger``).

Flower has no public logging API. cityfed uses its ``flwr`` logger in five ways, all here:
timestamps on every line (:func:`timestamped_logs`), the project's lines through Flower's
console handler (:func:`console_handler`, :func:`route_logs_through_flower`), logging into
Flower's log (:func:`log`) and quieting it after Flower configured it
(:func:`configure_flower_logger`). Flower colours its lines; :func:`plain` takes the colour
codes (and any other terminal sequence a node's text may carry) out of text that is not shown on
a terminal.
"""

from __future__ import annotations

import logging as _logging
import re

from flower_compat import register

#: Terminal colour codes (Flower's console handler colours the level of every line).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: Every terminal escape sequence: CSI (colours, cursor, clear screen), OSC (window title, OSC 8
#: links, OSC 52 clipboard) ended by BEL or ESC \\, DCS/SOS/PM/APC strings, two-character escapes.
TERMINAL_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]"
                               r"|\x1b[]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)"
                               r"|\x1b[ -/]*[0-Z\\-~]")
#: The format of the root handler Opacus 1.6 adds when imported (``logging.basicConfig`` in
#: ``opacus/utils/module_utils.py``).
OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def plain(text: str) -> str:
    """``text`` without terminal sequences, for a file, a pipe, the journal or a web page.

    Colour codes and every other complete escape sequence (CSI, OSC such as a window title or a
    hyperlink) are taken out; line ends stay (a CR LF pair becomes LF). Any other control,
    bidirectional or zero-width character (a lone CR that would overwrite a line, an unfinished
    sequence's ESC, U+202E) is shown escaped (``\\r``, ``\\x1b``, ``\\u202e``): a node's text in a
    log cannot forge a line.
    """
    from contract.text import escape_controls

    return escape_controls(TERMINAL_SEQUENCE.sub("", text.replace("\r\n", "\n")), keep="\n\t")


#: Colour codes (SGR), the only terminal sequences :func:`for_terminal` lets act.
SGR = re.compile(r"\x1b\[[0-9;]*m")


def for_terminal(text: str) -> str:
    """``text`` for a terminal: its colour codes act, every other control character is shown escaped.

    A log written before node text was cleaned where it arrives (``contract.text.peer_text``) may
    hold a node's window-title, hyperlink or clear-screen sequences and CR LF pairs that forge a
    line; on a terminal only Flower's colours are kept as they are.
    """
    from contract.text import escape_controls

    out, at = [], 0
    for m in SGR.finditer(text):
        out.append(escape_controls(text[at:m.start()], keep="\n\t"))
        out.append(m.group(0))
        at = m.end()
    out.append(escape_controls(text[at:], keep="\n\t"))
    return "".join(out)


def _on_terminal(handler: _logging.Handler) -> bool:
    """Whether ``handler`` writes to a terminal; a closed stream (``isatty`` raises ValueError) is none."""
    stream = getattr(handler, "stream", None)
    try:
        return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
    except (ValueError, OSError):  # closed, or detached from its file
        return False


def timestamped_logs() -> None:
    """Put the time (to the millisecond) on every line of this process's Flower log.

    Flower prints times only at ``FLWR_LOG_LEVEL=DEBUG``; operators (and
    ``benchmarks/deploy_latency.py``, which reads when each message was received and sent)
    need them at INFO too. Only the format changes; colour codes only where the log is a
    terminal (Flower colours every line, which left escape codes in log files and the journal).
    """
    from flwr.supercore.logger import console_handler as handler
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=_on_terminal(handler))


def console_handler() -> _logging.Handler:
    """Flower's console handler (the one the ``flwr`` logger prints through)."""
    from flwr.supercore.logger import console_handler as handler

    return handler


def route_logs_through_flower() -> None:
    """One line per log event, in Flower's format, coloured only on a terminal (idempotent).

    Opacus 1.6 calls ``logging.basicConfig`` when it is imported (the shared models import it),
    which puts a handler on the root logger. Flower's ``flwr`` logger propagates to the root, so
    every Flower line was printed twice (``INFO :      [ROUND 1/2]`` and
    ``12/05/2026 10:35:15:INFO:[ROUND 1/2]``). In a ServerApp process (``flwr-serverapp``) both
    went into the run's log at the SuperLink, which ``flwr log`` and ``fl-server logs`` show.

    This removes that one handler (a plain root ``StreamHandler`` with Opacus' exact format; any
    other root handler stays), gives the ``cityfed`` loggers Flower's console handler at INFO
    (the coordinator's own lines, e.g. excluded updates or a resume, appear once, in the same
    log and format as Flower's) and colours Flower's lines only where they go to a terminal.
    """
    from flwr.supercore.logger import update_console_handler

    handler = console_handler()
    root = _logging.getLogger()
    for h in list(root.handlers):
        if type(h) is _logging.StreamHandler and getattr(h.formatter, "_fmt", None) == OPACUS_ROOT_FORMAT:
            root.removeHandler(h)
    ours = _logging.getLogger("cityfed")
    if handler not in ours.handlers:
        ours.addHandler(handler)
    if ours.level == _logging.NOTSET:
        ours.setLevel(_logging.INFO)
    update_console_handler(colored=_on_terminal(handler))


def log(level: int, msg: str, *args, **kwargs) -> None:
    """Log ``msg % args`` at ``level`` through Flower's ``flwr`` logger (``flwr.supercore.log``)."""
    from flwr.supercore import log as flower_log

    flower_log(level, msg, *args, **kwargs)


#: The level names :func:`configure_flower_logger` accepts (any case), as its refusal lists them.
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(value: str | int, source: str = "the log level") -> int:
    """The :mod:`logging` level named by ``value``, in any case and without surrounding blanks.

    Parameters
    ----------
    value : str or int
        A level name (:data:`LEVELS`, or ``WARN``/``FATAL``, which :mod:`logging` also knows),
        e.g. ``"warning"``, or a level number.
    source : str
        Where the value came from, for the message (e.g. ``"CITYFED_FLWR_LOG"``).

    Returns
    -------
    int
        The level number.

    Raises
    ------
    ValueError
        ``value`` names no level: ``SOURCE='VALUE': not a log level; fix: ...`` (the allowed names).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    level = _logging.getLevelNamesMapping().get(str(value).strip().upper())
    if level is None or level == _logging.NOTSET:
        raise ValueError(f"{source}={value!r}: not a log level; fix: set it to {', '.join(LEVELS[:-1])} or "
                         f"{LEVELS[-1]} (any case), or unset it")
    return level


def configure_flower_logger(level: str | int, source: str = "the log level") -> None:
    """Let Flower configure its ``flwr`` logger (done when its logger module is imported), then set ``level``.

    Parameters
    ----------
    level : str or int
        A :mod:`logging` level name in any case (e.g. ``"WARNING"``, ``"debug"``) or number.
    source : str
        Where ``level`` came from, named in the refusal (e.g. ``"CITYFED_FLWR_LOG"``).

    Raises
    ------
    ValueError
        ``level`` names no level (:func:`log_level`); checked before Flower is imported.
    """
    number = log_level(level, source)
    import flwr.common.logger  # noqa: F401 - configures the "flwr" logger and its console handler

    _logging.getLogger("flwr").setLevel(number)


@register("logging")
def _self_test() -> None:
    """The logger names this seam uses."""
    import flwr.common.logger as common_logger
    import flwr.supercore as supercore
    import flwr.supercore.logger as sl

    assert callable(getattr(sl, "update_console_handler", None)), "flwr.supercore.logger.update_console_handler is gone"
    assert isinstance(getattr(sl, "console_handler", None), _logging.Handler), "flwr.supercore.logger.console_handler is gone"
    assert callable(getattr(supercore, "log", None)), "flwr.supercore.log is gone"
    assert callable(getattr(common_logger, "log", None)), "flwr.common.logger.log is gone"
