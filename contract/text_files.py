"""What every reader of a user's text file says about a UTF-8 byte-order mark.

TOML forbids a byte-order mark (BOM) and Flower's own readers refuse one, so the project's
readers of TOML and key files (policy, plausibility ranges, ``node.pub``, an app's
``pyproject.toml``) name it instead of stripping it, with one fix worded once here.
"""

from __future__ import annotations

#: The three bytes a "UTF-8 with BOM" editor writes at the start of a file.
UTF8_BOM = b"\xef\xbb\xbf"
#: The fix every BOM refusal gives.
BOM_FIX = "save it as UTF-8 without BOM (in Notepad: encoding 'UTF-8', not 'UTF-8 with BOM')"


def load_toml(text: str) -> dict:
    """``tomllib.loads`` with every refusal a :class:`tomllib.TOMLDecodeError`.

    ``tomllib`` raises ``ValueError`` for an integer over Python's 4300-digit limit and
    ``RecursionError`` for arrays or inline tables nested a few hundred deep; callers catch
    ``TOMLDecodeError`` alone, so those escaped as unexpected errors. The message says which
    limit was hit (and, for a number, its line), never the value.

    Parameters
    ----------
    text : str
        The TOML document.

    Returns
    -------
    dict
        The parsed document.

    Raises
    ------
    tomllib.TOMLDecodeError
        Invalid TOML, a number of more than 4300 digits, or nesting too deep to parse.
    """
    import re
    import sys
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise
    except RecursionError:
        raise tomllib.TOMLDecodeError("arrays or inline tables nested too deeply to read (hundreds of levels); "
                                      "write the value flat") from None
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        limit = sys.get_int_max_str_digits() or 4300
        long_number = re.compile(r"[0-9_]{%d,}" % (limit + 1))
        line = next((i for i, row in enumerate(text.splitlines(), 1) if long_number.search(row)), None)
        if line is None:
            raise tomllib.TOMLDecodeError("a value that cannot be converted (such as a number of more than "
                                          f"{limit} digits)") from None
        raise tomllib.TOMLDecodeError(f"a number of more than {limit} digits (at line {line}), longer than any "
                                      "setting can use; write the number it should be") from None


def printable(text: str) -> str:
    """``text`` with every invisible or non-printable character (ESC, BEL, newline, bidi marks, NBSP) escaped.

    For text read from a file that is shown on an operator's terminal: a terminal acts on
    control sequences (window title, clearing the screen), and rich escapes only its markup.
    Escapes what :func:`contract.text.escape_controls` escapes and, stricter, every other
    character Python does not call printable (spaces other than ``" "``, such as U+00A0).
    """
    from contract.text import is_hidden

    return "".join(c if c.isprintable() and not is_hidden(c) else c.encode("unicode_escape").decode("ascii")
                   for c in text)
