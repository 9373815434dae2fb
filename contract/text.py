"""Free text a peer chose (a node's refusal reason), made safe to log, store and print.

Both sides import it: the coordinator cleans a node's ``Error.reason`` where it receives it, and
the operator tools (``audit show``, log output) escape text written before that cleaning. A
terminal acts on control sequences (window title, clearing the screen, OSC 8 links) and a CR or
LF in a logged text forges a log line; bidirectional overrides and zero-width characters make
one text display as another. Each such character becomes a visible escape (``\\x1b``,
``\\u202e``); printable text, letters of any language included, stays as it is.
"""

from __future__ import annotations

import unicodedata

#: Longest peer text kept (characters, after escaping); a longer one is cut, with a marker saying so.
MAX_PEER_TEXT = 500
#: Characters escaped besides every control character (category Cc): bidirectional embeddings,
#: overrides and isolates, zero-width spaces/joiners and marks, the byte-order mark, line and
#: paragraph separators.
INVISIBLE = frozenset("\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                      "\u2066\u2067\u2068\u2069\ufeff\u2028\u2029")


def _escaped(c: str) -> str:
    return c.encode("unicode_escape").decode("ascii")


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with every control, bidirectional and zero-width character as a visible escape.

    Parameters
    ----------
    text : str
        Any text.
    keep : str
        Characters left as they are (``"\\n\\t"`` for a multi-line log text).

    Returns
    -------
    str
        ``ESC`` as ``\\x1b``, CR as ``\\r``, U+202E as ``\\u202e``; everything else unchanged.
    """
    return "".join(_escaped(c) if c not in keep and (c in INVISIBLE or unicodedata.category(c) == "Cc") else c
                   for c in text)


def peer_text(text: str | None, limit: int = MAX_PEER_TEXT) -> str | None:
    """A peer's free text (e.g. a node's refusal reason) as one escaped line of at most ``limit`` characters.

    Parameters
    ----------
    text : str or None
        The text as received (anything else is converted with ``str``); ``None`` stays ``None``.
    limit : int
        Most characters kept after escaping; an escape is never cut in half.

    Returns
    -------
    str or None
        :func:`escape_controls` of ``text``; when longer than ``limit``, its start followed by
        ``... [cut: N characters received]``.
    """
    if text is None:
        return None
    text = str(text)
    out, n = [], 0
    for c in text:
        piece = escape_controls(c)
        if n + len(piece) > limit:
            return "".join(out) + f"... [cut: {len(text)} characters received]"
        out.append(piece)
        n += len(piece)
    return "".join(out)
