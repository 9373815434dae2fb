"""Free text a peer chose (a node's refusal reason), made safe to log, store and print; invisible characters.

Both sides import it: the coordinator cleans a node's ``Error.reason`` where it receives it, and
the operator tools (``audit show``, log output) escape text written before that cleaning. A
terminal acts on control sequences (window title, clearing the screen, OSC 8 links) and a CR or
LF in a logged text forges a log line; bidirectional marks and overrides, zero-width and tag
characters make one text display as another or carry text nobody sees. Each such character
becomes a visible escape (``\\x1b``, ``\\u202e``); printable text, letters of any language
included, stays as it is.

One rule says which characters are invisible (:data:`INVISIBLE_CATEGORIES`): text is escaped
by it (:func:`escape_controls`, :func:`peer_text`, :func:`contract.text_files.printable`) and
site names are refused by it (:func:`hidden_in_name`, used by ``citydata.base``).
"""

from __future__ import annotations

import unicodedata

#: Longest peer text kept (characters, after escaping); a longer one keeps its start and its end,
#: with a marker saying how much was cut between them.
MAX_PEER_TEXT = 1000
#: Characters of the end kept when a peer text is cut (a node's refusal ends with its fix: the
#: ``fl-client app approve SHA256`` command is about 130 characters).
PEER_TEXT_TAIL = 200
#: Unicode categories of the invisible characters: controls (Cc: ESC, CR, LF, BEL ...), format
#: characters (Cf: bidirectional marks, embeddings, overrides and isolates, zero-width spaces and
#: joiners, the word joiner, the byte-order mark, the soft hyphen, tag characters), line and
#: paragraph separators (Zl, Zp). A name may not contain one (except a joiner between letters,
#: :func:`hidden_in_name`); text shows each escaped.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
#: Categories escaped in text besides those: surrogates (Cs, from undecodable bytes), private-use
#: (Co) and unassigned (Cn) code points, which no font can be relied on to show. Names may hold
#: them (a newer script, a local character in a private-use area).
UNSHOWN_CATEGORIES = frozenset({"Cs", "Co", "Cn"})
#: ZERO WIDTH NON-JOINER and ZERO WIDTH JOINER: part of correct spelling in Persian, Urdu and Indic
#: scripts, so allowed in a name where they join two letters or marks (as IDNA's ContextJ rule).
JOINERS = frozenset("\u200c\u200d")


def is_hidden(c: str) -> bool:
    """Whether text shows the character ``c`` escaped (:data:`INVISIBLE_CATEGORIES`, :data:`UNSHOWN_CATEGORIES`)."""
    cat = unicodedata.category(c)
    return cat in INVISIBLE_CATEGORIES or cat in UNSHOWN_CATEGORIES


def hidden_in_name(name: str) -> str | None:
    """The first invisible character of ``name`` that a name may not hold, or ``None``.

    Every character of :data:`INVISIBLE_CATEGORIES` counts, except U+200C and U+200D between two
    letters or marks (Unicode categories L* and M*), where Persian, Urdu and Indic spelling needs
    them. A soft hyphen (U+00AD) counts: it spells nothing and makes two names look alike.

    Parameters
    ----------
    name : str
        A name that becomes a file or ledger name (a site).

    Returns
    -------
    str or None
        The character (for the message, as ``U+XXXX``; never the name itself).
    """
    for i, c in enumerate(name):
        if unicodedata.category(c) not in INVISIBLE_CATEGORIES:
            continue
        joins = (c in JOINERS and 0 < i < len(name) - 1
                 and unicodedata.category(name[i - 1])[0] in "LM" and unicodedata.category(name[i + 1])[0] in "LM")
        if not joins:
            return c
    return None


def _escaped(c: str) -> str:
    return c.encode("unicode_escape").decode("ascii")


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with every invisible character (:func:`is_hidden`) as a visible escape.

    Parameters
    ----------
    text : str
        Any text.
    keep : str
        Characters left as they are (``"\\n\\t"`` for a multi-line log text).

    Returns
    -------
    str
        ``ESC`` as ``\\x1b``, CR as ``\\r``, U+202E as ``\\u202e``, a tag character as
        ``\\U000e0041``; everything else unchanged.
    """
    return "".join(_escaped(c) if c not in keep and is_hidden(c) else c for c in text)


def peer_text(text: str | None, limit: int = MAX_PEER_TEXT) -> str | None:
    """A peer's free text (e.g. a node's refusal reason) as one escaped line of about ``limit`` characters.

    Parameters
    ----------
    text : str or None
        The text as received (anything else is converted with ``str``); ``None`` stays ``None``.
    limit : int
        Most characters kept after escaping; an escape is never cut in half.

    Returns
    -------
    str or None
        :func:`escape_controls` of ``text``. When longer than ``limit``: its start and its last
        (up to :data:`PEER_TEXT_TAIL`, at most a third of ``limit``) characters, with
        `` ... [cut: N of M characters received] ... `` between them (where a refusal's fix
        usually stands, at its end, is kept).
    """
    if text is None:
        return None
    text = str(text)
    pieces = [_escaped(c) if is_hidden(c) else c for c in text]
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    tail_room = min(PEER_TEXT_TAIL, limit // 3)
    head, n = [], 0
    for p in pieces:
        if n + len(p) > limit - tail_room:
            break
        head.append(p)
        n += len(p)
    tail, m = [], 0
    for p in reversed(pieces[len(head):]):
        if m + len(p) > tail_room:
            break
        tail.append(p)
        m += len(p)
    cut = len(text) - len(head) - len(tail)
    end = f" ... {''.join(reversed(tail))}" if tail else ""
    return f"{''.join(head)} ... [cut: {cut} of {len(text)} characters received]{end}"
