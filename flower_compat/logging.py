"""Seam ``logging``: Flower's logger internals (``flwr.supercore.logger``, ``flwr.common.logger``).

Flower has no public logging API. cityfed uses its ``flwr`` logger in four ways, all here:
timestamps on every line (:func:`timestamped_logs`), the project's lines through Flower's
console handler (:func:`console_handler`), logging into Flower's log (:func:`log`) and quieting
it after Flower configured it (:func:`configure_flower_logger`).
"""

from __future__ import annotations

import logging as _logging

from flower_compat import register


def timestamped_logs() -> None:
    """Put the time (to the millisecond) on every line of this process's Flower log.

    Flower prints times only at ``FLWR_LOG_LEVEL=DEBUG``; operators (and
    ``benchmarks/deploy_latency.py``, which reads when each message was received and sent)
    need them at INFO too. Only the format changes; colour codes only where the log is a
    terminal (Flower colours every line, which left escape codes in log files and the journal).
    """
    from flwr.supercore.logger import console_handler as handler
    from flwr.supercore.logger import update_console_handler

    stream = getattr(handler, "stream", None)
    update_console_handler(timestamps=True, colored=bool(stream is not None and hasattr(stream, "isatty")
                                                         and stream.isatty()))


def console_handler() -> _logging.Handler:
    """Flower's console handler (the one the ``flwr`` logger prints through)."""
    from flwr.supercore.logger import console_handler as handler

    return handler


def log(level: int, msg: str, *args, **kwargs) -> None:
    """Log ``msg % args`` at ``level`` through Flower's ``flwr`` logger (``flwr.supercore.log``)."""
    from flwr.supercore import log as flower_log

    flower_log(level, msg, *args, **kwargs)


def configure_flower_logger(level: str | int) -> None:
    """Let Flower configure its ``flwr`` logger (done when its logger module is imported), then set ``level``.

    Parameters
    ----------
    level : str or int
        A :mod:`logging` level name or number, e.g. ``"WARNING"``.
    """
    import flwr.common.logger  # noqa: F401 - configures the "flwr" logger and its console handler

    _logging.getLogger("flwr").setLevel(level)


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
