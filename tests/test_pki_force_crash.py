"""``fl-pki ... --force`` killed between its renames leaves a matching pair and no old-key copies.

Found by a reliability review (2026-12-07, M2): the new pair was put in place with two renames
and the rollback ran only for Python exceptions, so a kill -9 between them left ``node.key`` of
the new pair beside ``node.pub`` of the old one (the department would register a key its node
does not hold) and a hidden hard-link copy of the OLD private key (``.node.key.<hex>.old``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _killed_force(out: Path, call: str = "replace", when: str = "rename") -> None:
    """Run ``fl-pki node-key --force`` and kill it (``os._exit(9)``, as kill -9) at its second key file ``os.<call>``.

    ``call="replace"``: the second rename of a new key file into place (after the journal); ``call="open"``: the
    creation of the second temporary, after the new node.key's was written and fsynced (before the journal).
    """
    script = textwrap.dedent(f"""
        import os, sys
        real, n = os.{call}, [0]
        def dying(path, *a, **k):
            names = (str(a[0]) if {call!r} == "replace" else "") + str(path)
            if ".tmp" in str(path) and ("node.key" in names or "node.pub" in names):
                n[0] += 1
                if n[0] == 2:
                    os._exit(9)  # as kill -9: no Python clean-up runs
            return real(path, *a, **k)
        os.{call} = dying
        sys.argv = ["fl-pki", "node-key", "--out", {str(out)!r}, "--department", "health", "--site", "Cleveland",
                    "--force"]
        from privacy.pki_cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, f"not killed at the {when} ({call}): " + proc.stdout + proc.stderr


def test_a_killed_force_is_finished_by_the_next_reader_and_the_pair_matches(tmp_path):
    from clients.cli import check_key
    from privacy import pki

    out = tmp_path / "node"
    _, _, old = pki.create_node_key(out, "health", "Cleveland")
    _killed_force(out)
    # the next fl-pki or fl-client that reads the folder finishes the replacement first
    assert pki.load_public_key(out / "node.pub").fingerprint == check_key(out / "node.key") != old
    left = sorted(p.name for p in out.iterdir())
    # no old private key copy, no temporary, no journal (node-replaced-<time>.pub: the old PUBLIC key, kept on purpose
    # so that `fl-client audit verify` can check the entries it signed)
    assert [n for n in left if not n.startswith("node-replaced-")] == ["node.key", "node.pub"], left


def test_fl_client_refuses_a_node_pub_of_another_key(tmp_path):
    """A mismatched pair (from any cause) is named at start-up: the coordinator registers node.pub."""
    import pytest

    from clients.cli import SetupError, check_key
    from privacy import pki

    pki.create_node_key(tmp_path / "a", "health", "Cleveland")
    pki.create_node_key(tmp_path / "b", "health", "Cleveland")
    (tmp_path / "a" / "node.pub").write_bytes((tmp_path / "b" / "node.pub").read_bytes())
    with pytest.raises(SetupError, match=r"node\.pub beside it is another key's"):
        check_key(tmp_path / "a" / "node.key")


# -- found by a review of the change (2026-12-07) ------------------------------------------------------------


def test_a_force_killed_before_its_journal_leaves_no_private_key_temporary(tmp_path):
    """Killed after the new node.key's temporary (a complete private key) was written, before the journal named it."""
    from clients.cli import check_key
    from privacy import pki

    out = tmp_path / "node"
    pki.create_node_key(out, "health", "Cleveland")
    _killed_force(out, "open", "second temporary")
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the killed writer's temporary is there ...
    check_key(out / "node.key")  # ... and the next fl-client start (or fl-pki) removes it
    assert [p.name for p in sorted(out.iterdir()) if not p.name.startswith("node-replaced-")] == ["node.key", "node.pub"]


def test_a_reader_leaves_a_live_replacement_to_its_writer(tmp_path, monkeypatch):
    """A reader in another process (an fl-client start) during a live --force finished the replacement itself: the
    writer then said "nothing was changed" although the new pair was in place, and lost its copy of the old node.pub."""
    from typer.testing import CliRunner

    from privacy import pki
    from privacy.pki_cli import app

    out = tmp_path / "node"
    _, _, old_fp = pki.create_node_key(out, "health", "Cleveland")
    old_pub = (out / "node.pub").read_bytes()
    real_link, fired = os.link, []

    def link_with_reader(src, dst, *a, **k):  # the writer's first step after its journal: another process reads now
        if not fired and str(dst).endswith(".old"):
            fired.append(subprocess.run([sys.executable, "-c", f"from privacy import pki; "
                                         f"print(pki.finish_interrupted_replace(__import__('pathlib').Path({str(out)!r})))"],
                                        cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip())
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link_with_reader)
    res = CliRunner().invoke(app, ["node-key", "--out", str(out), "--department", "health", "--site", "Cleveland",
                                   "--force"])
    monkeypatch.setattr(os, "link", real_link)
    assert fired == ["[]"], fired  # the reader did nothing: the writer is alive
    assert res.exit_code == 0, res.output
    assert pki.load_public_key(out / "node.pub").fingerprint != old_fp
    kept = [p for p in out.iterdir() if p.name.startswith("node-replaced-")]
    assert kept and kept[0].read_bytes() == old_pub
