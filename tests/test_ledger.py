"""The node-side privacy ledger: durable, conservative, and exact against Opacus."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the venv may not have cityfed installed (`make install` does)
    sys.path.insert(0, str(ROOT))

from privacy.ledger import SCHEMA_VERSION, BudgetExceededError, LedgerError, PrivacyLedger, Release

DELTA = 1e-5


def _rel(run="run-a", rnd=1, site="health-1", dept="health", noise=1.1, q=0.02, steps=50, delta=DELTA):
    return Release(
        noise_multiplier=noise, sample_rate=q, steps=steps, delta=delta,
        run_id=run, round=rnd, site=site, department=dept,
    )


def _run_py(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter (another process) with the repo on sys.path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _independent(steps: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    for noise, q, n in steps:
        for _ in range(n):
            acc.step(noise_multiplier=noise, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_empty_ledger_is_zero_and_schema_is_versioned(tmp_path):
    path = tmp_path / "deep" / "dir" / "ledger.sqlite"
    led = PrivacyLedger(path)
    assert path.is_file()
    assert led.epsilon("health-1", DELTA) == 0.0
    assert led.history("health-1") == [] and led.releases() == [] and led.runs("health-1") == []
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] in ("wal", "delete")
    con.close()


def test_epsilon_matches_independent_accountant_and_grows(tmp_path):
    led = PrivacyLedger(tmp_path / "l.db")
    plan = [(1.1, 0.02, 30), (1.1, 0.02, 30), (0.9, 0.05, 10), (2.0, 0.01, 100), (1.1, 0.02, 1)]
    fed: list[tuple[float, float, int]] = []
    last = 0.0
    for i, (noise, q, n) in enumerate(plan):
        rid = led.begin(_rel(rnd=i + 1, noise=noise, q=q, steps=n))
        led.commit(rid)
        fed.append((noise, q, n))
        for delta in (DELTA, 1e-3):
            assert led.epsilon("health-1", delta) == pytest.approx(_independent(fed, delta), rel=1e-9, abs=1e-9)
        eps = led.epsilon("health-1", DELTA)
        assert eps > last
        last = eps
    assert led.history("health-1") == fed


def test_projected_epsilon_is_epsilon_after_adding(tmp_path):
    led = PrivacyLedger(tmp_path / "l.db")
    led.commit(led.begin(_rel(rnd=1)))
    nxt = _rel(rnd=2, noise=0.8, steps=20)
    projected = led.projected_epsilon("health-1", nxt)
    assert projected > led.epsilon("health-1", DELTA)
    led.commit(led.begin(nxt))
    assert led.epsilon("health-1", DELTA) == pytest.approx(projected, rel=1e-12)


def test_epsilon_uses_requested_delta_not_recorded_one(tmp_path):
    led = PrivacyLedger(tmp_path / "l.db")
    led.commit(led.begin(_rel(rnd=1, delta=1e-3)))
    led.commit(led.begin(_rel(rnd=2, delta=1e-7)))
    for delta in (1e-3, 1e-5):
        assert led.epsilon("health-1", delta) == pytest.approx(
            _independent([(1.1, 0.02, 50)] * 2, delta), rel=1e-9
        )


def test_spans_runs(tmp_path):
    led = PrivacyLedger(tmp_path / "l.db")
    led.commit(led.begin(_rel(run="run-a", rnd=1)))
    one_run = led.epsilon("health-1", DELTA)
    led.commit(led.begin(_rel(run="run-b", rnd=1)))
    assert led.runs("health-1") == ["run-a", "run-b"]
    assert led.epsilon("health-1", DELTA) == pytest.approx(_independent([(1.1, 0.02, 50)] * 2, DELTA), rel=1e-9)
    assert led.epsilon("health-1", DELTA) > one_run


def test_sites_are_accounted_separately(tmp_path):
    led = PrivacyLedger(tmp_path / "l.db")
    led.commit(led.begin(_rel(site="health-1")))
    assert led.epsilon("traffic-1", DELTA) == 0.0
    with pytest.raises(LedgerError, match="belongs to department 'health'"):
        led.begin(_rel(site="health-1", dept="traffic"))


def test_pending_counts_and_aborted_does_not(tmp_path):
    led = PrivacyLedger(tmp_path / "l.db")
    committed = led.begin(_rel(rnd=1))
    led.commit(committed)
    eps1 = led.epsilon("health-1", DELTA)

    pending = led.begin(_rel(rnd=2))
    eps_pending = led.epsilon("health-1", DELTA)
    assert eps_pending > eps1  # a crash now must not under-count

    led.abort(pending, "data loader failed before any reply")
    assert led.epsilon("health-1", DELTA) == pytest.approx(eps1, rel=1e-12)
    rows = led.releases("health-1")
    assert [r["status"] for r in rows] == ["committed", "aborted"]
    assert rows[1]["reason"] == "data loader failed before any reply"
    assert rows[1]["created_at"] <= rows[1]["updated_at"]

    # no state change after a release is final
    with pytest.raises(LedgerError, match="only a 'pending'"):
        led.abort(committed, "oops")
    with pytest.raises(LedgerError, match="only a 'pending'"):
        led.commit(pending)
    with pytest.raises(LedgerError, match="no release with id"):
        led.commit(999)


def test_commit_records_actual_steps(tmp_path):
    led = PrivacyLedger(tmp_path / "l.db")
    rid = led.begin(_rel(steps=100))
    led.commit(rid, steps=37)
    row = led.releases()[0]
    assert (row["steps"], row["planned_steps"], row["status"]) == (37, 100, "committed")
    assert led.history("health-1") == [(1.1, 0.02, 37)]


def test_begin_with_budget_is_atomic_guard(tmp_path):
    led = PrivacyLedger(tmp_path / "l.db")
    big = _rel(noise=0.8, q=0.1, steps=100)
    with pytest.raises(BudgetExceededError, match="max_epsilon"):
        led.begin(big, max_epsilon=1.0, delta=DELTA)
    assert led.releases() == []
    led.begin(_rel(noise=1.5, q=0.01, steps=10), max_epsilon=1.0, delta=DELTA)
    assert len(led.releases()) == 1


def test_invalid_release_rejected():
    with pytest.raises(ValueError, match="sample_rate"):
        _rel(q=1.5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        _rel(noise=-1.0)
    with pytest.raises(ValueError, match="accountant"):
        Release(1.0, 0.1, 1, 1e-5, "r", 1, "s", "health", accountant="pld")


def test_survives_restart_in_another_process(tmp_path):
    path = tmp_path / "node" / "ledger.sqlite"
    led = PrivacyLedger(path)
    led.commit(led.begin(_rel(run="run-a", rnd=1)))
    eps1 = led.epsilon("health-1", DELTA)
    del led  # "restart": nothing kept in memory

    out = _run_py(
        """
        import sys
        from privacy.ledger import PrivacyLedger, Release
        led = PrivacyLedger(sys.argv[1])
        print(repr(led.epsilon("health-1", 1e-5)))
        rid = led.begin(Release(1.1, 0.02, 50, 1e-5, "run-b", 1, "health-1", "health"))
        led.commit(rid)
        print(repr(led.epsilon("health-1", 1e-5)))
        """,
        str(path),
    )
    seen, after = (float(x) for x in out.split())
    assert seen == pytest.approx(eps1, rel=1e-12)  # continued, not reset
    assert after > eps1

    reopened = PrivacyLedger(path)
    assert reopened.epsilon("health-1", DELTA) == pytest.approx(after, rel=1e-12)
    assert reopened.runs("health-1") == ["run-a", "run-b"]


def test_pending_row_survives_a_crash(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _run_py(
        """
        import os, sys
        from privacy.ledger import PrivacyLedger, Release
        led = PrivacyLedger(sys.argv[1])
        led.begin(Release(1.1, 0.02, 50, 1e-5, "run-a", 1, "health-1", "health"))
        os._exit(0)  # dies mid-round: no commit, no abort, no cleanup
        """,
        str(path),
    )
    led = PrivacyLedger(path)
    assert [r["status"] for r in led.releases()] == ["pending"]
    assert led.epsilon("health-1", DELTA) == pytest.approx(_independent([(1.1, 0.02, 50)], DELTA), rel=1e-9)


def test_concurrent_writers_do_not_lose_rows(tmp_path):
    path = tmp_path / "ledger.sqlite"
    PrivacyLedger(path)
    n = 150
    code = textwrap.dedent(
        """
        import sys
        from privacy.ledger import PrivacyLedger, Release
        path, run, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        led = PrivacyLedger(path)
        for r in range(1, n + 1):
            rid = led.begin(Release(1.1, 0.02, 5, 1e-5, run, r, "traffic-1", "traffic"))
            led.commit(rid)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), run, str(n)], env=env, stderr=subprocess.PIPE)
        for run in ("run-a", "run-b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    led = PrivacyLedger(path)
    rows = led.releases("traffic-1")
    assert len(rows) == 2 * n
    assert {r["status"] for r in rows} == {"committed"}
    assert len({r["id"] for r in rows}) == 2 * n
    for run in ("run-a", "run-b"):
        assert sorted(r["round"] for r in rows if r["run_id"] == run) == list(range(1, n + 1))
    assert sum(s for _, _, s in led.history("traffic-1")) == 2 * n * 5


def test_corrupt_file_gives_clear_error(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not an sqlite database at all\n" * 50)
    with pytest.raises(LedgerError) as exc:
        PrivacyLedger(path)
    assert str(path) in str(exc.value)
    assert "not a database" in str(exc.value)


def test_unwritable_path_gives_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    path = blocker / "sub" / "ledger.sqlite"  # parent is a regular file
    with pytest.raises(LedgerError) as exc:
        PrivacyLedger(path)
    assert str(path) in str(exc.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_directory_gives_clear_error(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(LedgerError) as exc:
            PrivacyLedger(d / "ledger.sqlite")
        assert str(d / "ledger.sqlite") in str(exc.value)
    finally:
        d.chmod(0o700)


def test_other_database_or_newer_schema_refused(tmp_path):
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE users (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="not a privacy ledger"):
        PrivacyLedger(other)

    newer = tmp_path / "newer.db"
    PrivacyLedger(newer)
    con = sqlite3.connect(newer)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="newer"):
        PrivacyLedger(newer)


def test_memoized_rdp_matches_opacus_accountant_on_random_histories():
    """The cached per-step RDP gives Opacus' own ``get_epsilon`` for any history."""
    from hypothesis import given, settings, strategies as st

    from privacy.ledger import rdp_epsilon

    release = st.tuples(
        st.sampled_from([0.0, 0.5, 0.8, 1.1, 2.5]),
        st.sampled_from([0.001, 0.02, 0.25, 1.0]),
        st.integers(min_value=0, max_value=400),
    )

    @settings(max_examples=25, deadline=None)
    @given(st.lists(release, min_size=1, max_size=5), st.sampled_from([1e-6, 1e-5, 1e-3]))
    def check(history, delta):
        acc = RDPAccountant()
        acc.history = list(history)
        expected = acc.get_epsilon(delta=delta)
        got = rdp_epsilon(history, delta)
        assert got == pytest.approx(expected, rel=1e-12, abs=0) or (got == expected == float("inf"))

    check()


def _delete_mode_db(path: Path, *statements: str) -> None:
    """An SQLite file in rollback-journal mode (header bytes 18-19 are 1, WAL would make them 2)."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = DELETE")
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()


def _damaged_ledger(path: Path) -> None:
    PrivacyLedger(path)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()
    data = bytearray(path.read_bytes())
    data[100:len(data) // 4] = b"\x07" * (len(data) // 4 - 100)  # page 1's schema, after the header
    path.write_bytes(bytes(data))


_REFUSED = {
    "other-database": (lambda p: _delete_mode_db(p, "CREATE TABLE t (x)", "INSERT INTO t VALUES (1)"),
                       "not a privacy ledger"),
    "newer-schema": (lambda p: _delete_mode_db(p, "CREATE TABLE releases (x)", f"PRAGMA user_version = {SCHEMA_VERSION + 7}"),
                     "newer"),
    # another program's table that happens to be called releases: was "cannot initialise: no such column: site;
    # fix: pass a writable path"
    "foreign-releases-table": (lambda p: _delete_mode_db(p, "CREATE TABLE releases (tag TEXT, notes TEXT)",
                                                         "INSERT INTO releases VALUES ('v1', 'x')"), "not a privacy ledger"),
    "not-sqlite": (lambda p: p.write_bytes(b"this is not an sqlite database at all\n" * 50), "not a database"),
    "random-bytes": (lambda p: p.write_bytes(bytes(range(256)) * 16), "not a database"),
    "damaged": (_damaged_ledger, "malformed"),
}


@pytest.mark.parametrize("kind", sorted(_REFUSED))
def test_refused_file_is_left_byte_for_byte(tmp_path, kind):
    """A file the ledger refuses is checked read-only: before the fix, opening an SQLite file that is not
    a ledger (or is from a newer schema) switched it to WAL (header bytes 18-19 went from 1 to 2)."""
    make, says = _REFUSED[kind]
    path = tmp_path / "L.sqlite"
    make(path)
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=says) as exc:
        PrivacyLedger(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L.sqlite"]  # no -wal / -shm / -journal left
    err = exc.value
    assert err.problem and err.fix and str(path) in str(err)
    assert says in err.problem and "fix" not in err.problem.lower(), err.problem
    assert str(err).count("Fix: ") == 1 and str(err).endswith(f"Fix: {err.fix}."), str(err)


def test_empty_file_becomes_a_ledger(tmp_path):
    """A 0-byte file (``install -m 600 /dev/null ledger.sqlite``) is an empty SQLite database: it becomes a ledger."""
    path = tmp_path / "L.sqlite"
    path.write_bytes(b"")
    led = PrivacyLedger(path)
    assert led.epsilon("health-1", DELTA) == 0.0
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()



@pytest.mark.parametrize("message", ["disk I/O error", "database or disk is full"])
def test_a_full_disk_is_named_and_the_fix_keeps_the_same_ledger(tmp_path, monkeypatch, message):
    """On a full file system SQLite says "disk I/O error" (the WAL's -shm cannot be made); the ledger's
    message had no cause and fl-client added "pass a writable path", pointing at a NEW ledger, that is, a
    fresh budget (independent reliability review, 2026-12-07)."""
    import collections
    import shutil
    import sqlite3

    from privacy.ledger import LedgerError, PrivacyLedger

    led = PrivacyLedger(tmp_path / "ledger.sqlite")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2 << 20, 2 << 20, 0))
    err = led._fail("cannot open", sqlite3.OperationalError(message))
    assert isinstance(err, LedgerError)
    assert "full" in err.problem and "same ledger" in err.fix and "free" in err.fix, (err.problem, err.fix)
