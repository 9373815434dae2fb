"""``fl-server``'s operator-facing error, and the Flower run and node IDs it checks.

One job: what a refusal of ``fl-server`` is (:class:`CliError`: a message naming the file or
option and the fix, the exit code, Flower's error code when it is Flower's answer), Flower's
error codes and ID range, and the checks and messages for run and node IDs that the other
``server`` modules of ``fl-server`` share (:func:`check_flower_id`, :func:`unknown_run`).
"""

from __future__ import annotations

import re

class CliError(Exception):
    """An operator-facing error: message names the file/option and the fix; ``code`` is the exit code.

    Attributes
    ----------
    code : int
        The exit status.
    flower_code : int or None
        Flower's error code (``[code: 16]``) when the error is Flower's answer.
    """

    def __init__(self, message: str, code: int = 2, flower_code: int | None = None):
        super().__init__(message)
        self.code = code
        self.flower_code = flower_code


#: Flower's error codes (``flwr.supercore.error.ApiErrorCode``) that mean a bad run or node ID.
RUN_ID_NOT_FOUND = 16
NODE_NOT_FOUND = 24
#: Largest run or node ID (Flower's are unsigned 64-bit integers).
MAX_FLOWER_ID = 2**64 - 1
#: The fix for a run that is not known (here or to Flower).
FIX_RUN = "use a folder name or run ID from `fl-server runs`"
#: The fix for a node ID that is not known to Flower.
FIX_NODE = "use a node ID from `fl-server nodes`"


def check_flower_id(value: str, what: str, fix: str) -> str:
    """Refuse a run or node ID that is not a whole number from 0 to 2**64 - 1 (Flower's IDs).

    Returns
    -------
    str
        ``value`` without leading zeros.

    Raises
    ------
    CliError
        Code 2, naming the value and ``fix``.
    """
    text = str(value).strip()
    # at most 20 digits (2**64 - 1 has 20) before int(): Python refuses to convert over 4300
    if not re.fullmatch(r"[0-9]+", text) or len(text.lstrip("0")) > 20 or int(text) > MAX_FLOWER_ID:
        raise CliError(f"{what} {value!r}: not a Flower {what.split()[0]} ID (a whole number from 0 to "
                       f"{MAX_FLOWER_ID}); fix: {fix}")
    return str(int(text))


def unknown_run(run: str, rid: str) -> CliError:
    """The error for a run ID the coordinator does not know (Flower's ``[code: 16]``)."""
    shown = f"run {run!r}" + (f" (Flower run {rid})" if str(run) != str(rid) else "")
    return CliError(f"{shown}: not known to the coordinator ([code: {RUN_ID_NOT_FOUND}] Run ID not found); fix: "
                    f"{FIX_RUN}", 2)
