"""``fl-pki ... --force`` killed between its renames leaves a matching pair and no old-key copies.

Found by a reliability review (2026-12-07, M2): the new pair was put in place with two renames
and the rollback ran only for Python exceptions, so a kill -9 between them left ``node.key`` of
the new pair beside ``node.pub`` of the old one (the department would register a key its node
does not hold) and a hidden hard-link copy of the OLD private key (``.node.key.<hex>.old``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _killed_force(out: Path) -> None:
    """Run ``fl-pki node-key --force`` and kill it (os._exit) at the second key-file rename."""
    script = textwrap.dedent(f"""
        import os, sys
        real, n = os.replace, [0]
        def dying(src, dst, *a, **k):
            if str(dst).endswith(("node.key", "node.pub")) and ".tmp" in str(src):
                n[0] += 1
                if n[0] == 2:
                    os._exit(9)  # as kill -9: no Python clean-up runs
            return real(src, dst, *a, **k)
        os.replace = dying
        sys.argv = ["fl-pki", "node-key", "--out", {str(out)!r}, "--department", "health", "--site", "Cleveland",
                    "--force"]
        from privacy.pki_cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stdout + proc.stderr


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
