"""argparse ``type`` checkers shared by the benchmark scripts: a bad argument is refused at once.

argparse turns :class:`argparse.ArgumentTypeError` into exit 2 naming the option; the message
names the value, what is allowed and a fix.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def whole_number(low: int, example: str, why: str = "") -> Callable[[str], int]:
    """A whole number >= ``low``.

    Parameters
    ----------
    low : int
        The smallest value allowed.
    example : str
        A valid use of the option, shown as the fix.
    why : str
        Why ``low`` is the least (optional, e.g. " (SecAgg+ needs at least 3 nodes)").

    Returns
    -------
    callable
        ``str -> int``, raising :class:`argparse.ArgumentTypeError`.
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= {low}{why}; fix: e.g. {example}")
        return value

    return parse


def finite_number(low: float, example: str, *, inclusive: bool = True, unit: str = "") -> Callable[[str], float]:
    """A finite number >= ``low`` (``inclusive``) or > ``low``.

    Parameters
    ----------
    low : float
        The bound.
    example : str
        A valid use of the option, shown as the fix.
    inclusive : bool
        Whether ``low`` itself is allowed.
    unit : str
        What the number counts, for the message (e.g. "of seconds ").

    Returns
    -------
    callable
        ``str -> float``, raising :class:`argparse.ArgumentTypeError` (NaN and infinity included).
    """
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number {unit}{'>=' if inclusive else '>'} "
                                             f"{low:g}; fix: e.g. {example}")
        return value

    return parse
