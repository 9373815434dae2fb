"""One rule for invisible characters: escaped in a peer's text, refused in site names (review s19, findings 2, 5, 6, 9).

Each test failed before its fix: site names in Persian (U+200C) and Devanagari (U+200D) spelling were refused;
U+061C, U+2060 and the tag characters passed ``peer_text``, ``plain`` and ``for_terminal`` raw; the 500-character cut
dropped the ``fl-client app approve`` command from a node's pinning refusal; a node-chosen metric key or array name of
any length reached the exclusion reason whole.
"""
import unicodedata

import pandas as pd
import pytest

from citydata.base import DataFileError, check_site_names

#: Persian "hospitals" (ZWNJ between the word and its plural suffix), Tehran University of Medical Sciences, and
#: Devanagari KSSA with an explicit half form (virama, ZWJ).
JOINED_NAMES = ["بیمارستان\u200cها", "دانشگاه\u200cعلوم پزشکی تهران", "क्\u200dष", "ക്\u200dക"]
#: Arabic letter mark (a bidi mark), word joiner, tag LATIN CAPITAL A, right-to-left override, zero-width space, BOM.
HIDDEN = ["\u061c", "\u2060", "\U000e0041", "\u202e", "\u200b", "\ufeff"]
HIDDEN_IDS = ["ALM", "WJ", "TAG-A", "RLO", "ZWSP", "BOM"]


def _frame(name: str) -> pd.DataFrame:
    return pd.DataFrame({"dataset": ["Cleveland", name, name]})


@pytest.mark.parametrize("name", JOINED_NAMES, ids=["fa-plural", "fa-university", "hi-half-form", "ml-chillu"])
def test_site_names_spelt_with_joiners_between_letters_are_accepted(name):
    check_site_names(_frame(name), "dataset", "x.csv")  # no DataFileError


@pytest.mark.parametrize("ch", HIDDEN, ids=HIDDEN_IDS)
def test_site_names_with_an_invisible_character_are_refused(ch):
    with pytest.raises(DataFileError) as info:
        check_site_names(_frame(f"North{ch}gnp.exe"), "dataset", "x.csv")
    err = info.value
    assert f"U+{ord(ch):04X}" in err.problem and "rows 2 and 3" in err.problem and ch not in str(err), str(err)
    assert "invisible" in err.fix and "'dataset'" in str(err), str(err)


@pytest.mark.parametrize("name", ["North\u200c", "\u200dNorth", "North \u200cSouth", "North\u200c\u200cSouth",
                                  "North\u200c1", "North\u00adSouth"],
                         ids=["joiner-last", "joiner-first", "after-space", "two-joiners", "before-digit", "soft-hyphen"])
def test_a_joiner_not_between_two_letters_and_a_soft_hyphen_are_refused(name):
    """ZWNJ/ZWJ only where they join two letters or marks (like IDNA's ContextJ); a soft hyphen spells nothing."""
    with pytest.raises(DataFileError, match="invisible character U\\+"):
        check_site_names(_frame(name), "dataset", "x.csv")


@pytest.mark.parametrize("ch", HIDDEN + ["\u200c", "\u200d", "\u00ad", "\u206e", "\ufff9", "\u2029"],
                         ids=HIDDEN_IDS + ["ZWNJ", "ZWJ", "SHY", "NADS", "IAA", "PSEP"])
def test_every_invisible_character_is_escaped_in_peer_text_and_log_output(ch):
    from contract.text import peer_text
    from flower_compat.logging import for_terminal, plain

    escaped = ch.encode("unicode_escape").decode("ascii")
    for shown in (peer_text(f"ok{ch}ok"), plain(f"ok{ch}ok\n"), for_terminal(f"\x1b[33mok\x1b[0m{ch}ok\n")):
        assert ch not in shown and escaped in shown, repr(shown)


def test_one_rule_for_every_format_and_separator_character():
    from contract.text import escape_controls
    from contract.text_files import printable

    every = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp")]
    assert len(every) > 200
    text = "".join(every)
    assert not set(escape_controls(text)) & set(every) and not set(printable(text)) & set(every)
    assert escape_controls("Zürich – Ost, بیمارستان ها 3 €") == "Zürich – Ost, بیمارستان ها 3 €"


def test_printable_still_escapes_what_it_escaped():
    """``audit verify`` shows a broken line with printable(): non-ASCII spaces and surrogates stay escaped."""
    from contract.text_files import printable

    text = "a\x1b\u00a0\u3000\udc80\u202e\ue000 b"
    assert printable(text) == "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                                      for c in text)


# -- finding 6: the cut keeps the end of the text --------------------------------------------------------------
SHA = "ab" * 32
FILES = ["clients/node.py", "clients/app.py", "clients/training.py", "clients/counts.py", "privacy/ledger.py",
         "privacy/policy.py", "server/strategy.py"]


def _refusal(files) -> str:
    from clients.pinning import Finding, Verdict

    findings = tuple(Finding(f, "modified", "differs from the installed release") for f in files)
    return Verdict(sha256=SHA, accepted=False, rule="", findings=findings).reason()


@pytest.mark.parametrize("files,limit", [(FILES, None), (FILES, 500), ([f"{'deep/' * 30}m{i}.py" for i in range(12)], None)],
                         ids=["7-files", "7-files-limit-500", "12-long-paths"])
def test_a_cut_pinning_refusal_keeps_its_approve_command(files, limit):
    from contract.text import MAX_PEER_TEXT, peer_text

    reason = _refusal(files)
    kept = peer_text(reason) if limit is None else peer_text(reason, limit=limit)
    assert f"fl-client app approve {SHA}`" in kept and kept.startswith("app not approved by this department"), kept
    assert len(kept) <= (limit or MAX_PEER_TEXT) + 60, len(kept)
    if len(reason) > (limit or MAX_PEER_TEXT):
        assert f"of {len(reason)} characters received] ... " in kept, kept


def test_the_cut_never_splits_an_escape_and_stays_bounded():
    import re

    from contract.text import peer_text

    for text in ("\x1b" * 5000, "a" * 333 + "\u202e" * 2000 + "end", "\U000e0041" * 3000):
        kept = peer_text(text, limit=301)
        head, _, tail = kept.partition(" ... [cut: ")
        tail = tail.split("] ... ", 1)[1]
        for part in (head, tail):
            assert re.fullmatch(r"(?:[a-z]|\\x1b|\\u202e|\\U000e0041)*", part), part[-20:]
        assert len(head) + len(tail) <= 301 and tail, (len(head), len(tail))


# -- finding 9: node-chosen keys in exclusion reasons ---------------------------------------------------------
def test_a_huge_metric_key_is_cut_in_the_exclusion_reason():
    from server.validation import unexpected_metrics

    reason = unexpected_metrics({"x" * 200_000: 1.0, "\u202eevil": 2.0, "\U000e0041tag": 3.0}, ("num-examples",))
    assert len(reason) < 1000 and "\u202e" not in reason and "\U000e0041" not in reason, len(reason)
    assert "200000 characters received" in reason and "outside the job contract" in reason, reason


def test_a_huge_array_name_is_cut_in_the_exclusion_reason():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from server.validation import validate_update

    glob = {"w": np.zeros(3, dtype=np.float32)}
    sent = ArrayRecord({"y" * 200_000: Array(np.zeros(3, dtype=np.float32)), "\u202ez": Array(np.zeros(1))})
    reason = validate_update(sent, glob, 10.0)
    assert len(reason) < 1000 and "\u202e" not in reason and "200000 characters received" in reason, reason[:300]
    assert "missing ['w']" in reason, reason
