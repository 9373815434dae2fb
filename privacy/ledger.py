"""Durable, node-local record of every differentially private release.

Each department node keeps a :class:`PrivacyLedger` on its own disk: one SQLite file with a
row per DP release, i.e. per round of local DP-SGD whose result left (or may have left) the
node. The node's epsilon is never stored; it is always recomputed from these rows, so the
lifetime budget spans runs, restarts and crashes. The accountant is the department policy's
choice (``accountant = "rdp"``, the default, or ``"prv"``; :mod:`privacy.accounting`), given to
the ledger when it is opened: each row records the accountant in force when it was written,
and an epsilon is always the accountant in force *now* over the *whole* history (both are
valid upper bounds for every row, so a ledger that switched accountants stays correct).

Life cycle of a release::

    rid = ledger.begin(release)          # 'pending' row, written BEFORE training starts
    try:
        update = train(...)
    except Exception as exc:             # nothing left the node
        ledger.abort(rid, reason=repr(exc))
        raise
    ledger.commit(rid, steps=actual_steps)   # 'committed'
    return update                        # the release leaves the node

Pending rows count toward epsilon (a crash between ``begin`` and ``commit`` must never
under-count); aborted rows are kept for audit but do not count.

Durability: WAL journal with ``synchronous=FULL`` (every committed transaction is on disk
before the call returns), every write in its own ``BEGIN IMMEDIATE`` transaction, a busy
timeout so several processes (e.g. a Flower ClientApp restarted while an old one drains)
can share the file. A fresh SQLite connection is opened per operation, so a ledger object
may be used from several threads and survives ``fork``.
"""

from __future__ import annotations

import math
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from privacy.accounting import ACCOUNTANTS, _rdp_one_step, rdp_epsilon  # noqa: F401 (re-exported)
from privacy.accounting import epsilon as composed_epsilon

__all__ = ["BudgetExceededError", "LedgerError", "PrivacyLedger", "Release", "RunCapExceededError", "SCHEMA_VERSION",
           "rdp_epsilon"]

#: Version of the on-disk schema, stored in ``PRAGMA user_version`` (2 added ``mechanism`` and
#: ``replay``; a version-1 ledger is upgraded in place, its rows marked ``dp-sgd``, not replays).
SCHEMA_VERSION = 2

#: Release mechanisms: a round of DP-SGD (Poisson-subsampled Gaussian), and Gaussian-mechanism
#: releases of clipped per-record sums (:mod:`privacy.releases`): a training loss, evaluation
#: metrics. A Gaussian mechanism with noise multiplier sigma and k released sums is accounted as
#: ``(sigma, sample_rate=1, steps=k)``: the sampled Gaussian at q = 1 IS the Gaussian mechanism.
#: A round trained without DP (the policy's ``require_dp = false``) is recorded as ``non-private``
#: ``(0, 1, 1)``: no noise, so the site's epsilon is infinite from then on and no later release fits
#: a finite budget.
#: ``gaussian-count``: the site's record count (of its training or test split) with Gaussian noise
#: (sensitivity 1), released once per data set and reused (:meth:`PrivacyLedger.released_count`).
MECHANISMS = ("dp-sgd", "gaussian-train-loss", "gaussian-eval", "personalisation", "non-private", "gaussian-count")

#: Seconds a connection waits for a lock held by another process before failing.
DEFAULT_TIMEOUT_S = 30.0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    site             TEXT    NOT NULL,
    department       TEXT    NOT NULL,
    run_id           TEXT    NOT NULL,
    round            INTEGER NOT NULL,
    noise_multiplier REAL    NOT NULL CHECK (noise_multiplier >= 0),
    sample_rate      REAL    NOT NULL CHECK (sample_rate >= 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 0),
    planned_steps    INTEGER NOT NULL CHECK (planned_steps >= 0),
    delta            REAL    NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant       TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('pending', 'committed', 'aborted')),
    reason           TEXT,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL,
    mechanism        TEXT    NOT NULL DEFAULT 'dp-sgd',
    replay           INTEGER NOT NULL DEFAULT 0 CHECK (replay IN (0, 1))
);
CREATE INDEX IF NOT EXISTS releases_site_status ON releases (site, status);
"""

#: Central-DP participations (run config ``central-dp``): NOT releases of this node's privacy budget and
#: never composed into its epsilon. Each row records that the node sent a clipped update to a central-DP
#: round and what the coordinator *claimed* (its noise and the published model's epsilon): a claim the node
#: cannot verify (the coordinator adds the noise). Added without a schema version change: older code
#: ignores the table.
_CENTRAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS central_claims (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    site                   TEXT    NOT NULL,
    department             TEXT    NOT NULL,
    run_id                 TEXT    NOT NULL,
    round                  INTEGER NOT NULL,
    clipping_norm_asked    REAL    NOT NULL,
    clipping_norm_applied  REAL    NOT NULL,
    claimed_noise_multiplier REAL,
    claimed_sample_rate    REAL,
    claimed_epsilon        REAL,
    claimed_delta          REAL,
    claimed_accountant     TEXT,
    created_at             TEXT    NOT NULL
)
"""


#: The noised record counts a node has released (one per site, split and exact count: a data set that
#: changes size gets a new, accounted release), so that every later reply reuses the same value (reuse
#: is post-processing and costs nothing more). ``exact`` never leaves the node. Added without a schema
#: version change: older code ignores the table.
_META_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
)
"""

_COUNTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS released_counts (
    site        TEXT    NOT NULL,
    split       TEXT    NOT NULL,
    exact       INTEGER NOT NULL,
    value       INTEGER NOT NULL CHECK (value >= 1),
    release_id  INTEGER NOT NULL REFERENCES releases (id),
    created_at  TEXT    NOT NULL,
    PRIMARY KEY (site, split, exact)
)
"""


class LedgerError(RuntimeError):
    """The ledger file cannot be created, opened, read or written, or a call is invalid.

    The message always names the ledger file.

    Parameters
    ----------
    message : str
        The full message: ``privacy ledger '<path>': <problem>. Fix: <fix>.`` when both are known.
    problem : str, optional
        What is wrong, without the file's path and without the fix.
    fix : str, optional
        What the operator should do (no leading "Fix:", no final period); ``None`` when the ledger
        has no specific advice.

    Attributes
    ----------
    problem, fix : str or None
        As given, so that a caller which names the file its own way (``--ledger <path>: ...``) can
        say the problem and ONE fix instead of wrapping a message that already has a fix.
    """

    def __init__(self, message: str, *, problem: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.problem = problem
        self.fix = fix


class BudgetExceededError(LedgerError):
    """:meth:`PrivacyLedger.begin` was given a budget and the release would exceed it.

    Attributes
    ----------
    reason : str
        The message without the ledger file's path: what a node may send its coordinator (the
        full message, with the path, is for the node's operator and log).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message


class RunCapExceededError(LedgerError):
    """:meth:`PrivacyLedger.begin` was given a per-run cap and the run already has that many releases.

    Attributes
    ----------
    done, cap : int
        The run's counted releases of the capped mechanisms, and the cap.
    """

    def __init__(self, message: str, done: int, cap: int):
        super().__init__(message)
        self.done, self.cap = int(done), int(cap)


@dataclass(frozen=True)
class Release:
    """One DP release: a round of local DP-SGD whose result leaves the node.

    Parameters
    ----------
    noise_multiplier : float
        Gaussian noise standard deviation divided by the clipping norm (``>= 0``; 0 means
        no privacy and gives an infinite epsilon).
    sample_rate : float
        Poisson sampling rate in ``[0, 1]``: each record joins each step's batch with this probability
        (DP-SGD: ``1 / ceil(n / batch_size)`` of the count the node may reveal, ``clients.node.public_count``).
    steps : int
        Number of noisy optimizer steps (planned; the actual count may be given at commit).
    delta : float
        The delta the job was run for (kept for audit; epsilon is always computed at the
        delta passed to :meth:`PrivacyLedger.epsilon`).
    run_id, round : str, int
        Federated run and server round that asked for the release.
    site : str
        The node's identity; one accountant per site.
    department : str
        Department owning the site (``health``, ``traffic``, ``utility``).
    accountant : str, optional
        Accountant of the ledger it is recorded in (``"rdp"`` or ``"prv"``); ``None`` (the
        default) takes the ledger's. The row stores the accountant that checked it.
    mechanism : str
        One of :data:`MECHANISMS` (``"dp-sgd"`` by default).
    replay : bool
        The run asked for this round before (e.g. it was resumed after a crash in this round):
        counted again, marked for audit.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    run_id: str
    round: int
    site: str
    department: str
    accountant: str | None = None
    mechanism: str = "dp-sgd"
    replay: bool = False

    def __post_init__(self) -> None:
        problems = []
        nm, q, d = self.noise_multiplier, self.sample_rate, self.delta
        if isinstance(nm, bool) or not isinstance(nm, (int, float)) or math.isnan(nm) or nm < 0:
            problems.append(f"noise_multiplier must be a number >= 0 (got {nm!r})")
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            problems.append(f"sample_rate must be in [0, 1] (got {q!r})")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            problems.append(f"steps must be an int >= 0 (got {self.steps!r})")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d < 1.0:
            problems.append(f"delta must be in (0, 1) (got {d!r})")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            problems.append(f"round must be an int >= 0 (got {self.round!r})")
        for name in ("run_id", "site", "department"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                problems.append(f"{name} must be a non-empty string (got {value!r})")
        if self.accountant is not None and self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))} (got {self.accountant!r})")
        if self.mechanism not in MECHANISMS:
            problems.append(f"mechanism must be one of {', '.join(MECHANISMS)} (got {self.mechanism!r})")
        if problems:
            raise ValueError("invalid Release: " + "; ".join(problems))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class PrivacyLedger:
    """Node-local SQLite ledger of DP releases; epsilon is recomputed from it on demand.

    Parameters
    ----------
    path : str or os.PathLike
        Ledger file. Parent directories and the schema are created when missing.
    timeout : float, optional
        Seconds to wait for another process' lock (default 30).
    accountant : {"rdp", "prv"}
        How epsilon is computed from the rows (:func:`privacy.accounting.epsilon`): the node's
        policy's ``accountant``. Default ``"rdp"``.

    Raises
    ------
    LedgerError
        The file cannot be created or is not a ledger (corrupt, other database, newer
        schema). The message names the file.

    Notes
    -----
    The file uses the WAL journal with ``synchronous=FULL``; keep it on a local disk (WAL
    does not work on network file systems). Every write is a single ``BEGIN IMMEDIATE``
    transaction, so concurrent writers from several processes serialize instead of losing
    rows.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT_S, accountant: str = "rdp"):
        self.path = Path(path)
        self.timeout = float(timeout)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))} (got {accountant!r})")
        self.accountant = accountant
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(
                f"privacy ledger {str(self.path)!r}: cannot create its directory: {exc}. "
                "Fix: point the ledger at a writable local path."
            ) from exc
        if self.path.exists() and not self.path.is_file():
            raise self._refuse("exists but is not a regular file", "pass the path of the ledger file itself")
        self._check_existing()
        with self._connect(init=True) as con:
            self._init_schema(con)

    # -- connection handling -------------------------------------------------------------
    def _refuse(self, problem: str, fix: str | None) -> LedgerError:
        """A :class:`LedgerError` naming the file, with ``problem`` and ``fix`` also kept apart."""
        tail = f" Fix: {fix}." if fix else ""
        return LedgerError(f"privacy ledger {str(self.path)!r}: {problem}.{tail}", problem=problem, fix=fix)

    def _fail(self, what: str, exc: BaseException) -> LedgerError:
        problem, fix = f"{what}: {exc}", None
        text = str(exc).lower()
        if "not a database" in text or "malformed" in text:
            problem += " (the file is corrupt or not a privacy ledger)"
            fix = ("restore the node's ledger from backup, or pass the right ledger path "
                   "(never delete a ledger: that resets the node's privacy budget)")
        elif "readonly" in text or "unable to open" in text or "permission" in text:
            fix = "make the file and its directory writable by this process"
        elif "disk i/o error" in text or "disk is full" in text:
            import shutil

            try:
                free = shutil.disk_usage(self.path.parent).free
            except OSError:
                free = None
            keep = ("then start again with the same ledger (never a new or another one: that resets the node's "
                    "privacy budget)")
            if free is not None and free < 4 * 1024 * 1024:
                problem += f" (the file system holding it is full: {free:,} bytes free)"
                fix = f"free space on the file system of {self.path.parent}, {keep}"
            else:
                problem += " (a disk error, or the file system was full)"
                fix = f"free space and check the disk (the system log names errors), {keep}"
        elif "locked" in text or "busy" in text:
            problem += f" (another process held the lock for more than {self.timeout:g} s)"
            fix = "stop the other process that uses this ledger, or try again when it is done"
        return self._refuse(problem, fix)

    def _check_existing(self) -> None:
        """Refuse an existing file that is not a usable ledger, reading it only (nothing is written).

        Opening a file read-write first switched it to WAL (header bytes 18-19), so a refused file was
        changed. A missing or empty file is left to :meth:`_init_schema` (it becomes a new ledger).
        """
        try:
            if self.path.stat().st_size == 0:
                return
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._fail("cannot open", exc) from exc
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._fail("cannot open", exc) from exc
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
                return  # e.g. a hot journal to roll back: needs the read-write open, which checks again
            raise self._fail("cannot open", exc) from exc
        finally:
            con.close()
        self._check_version(version, tables)

    def _check_version(self, version: int, tables: set[str]) -> None:
        """Raise :class:`LedgerError` when ``user_version`` / ``tables`` are not those of a ledger."""
        if version > SCHEMA_VERSION:
            raise self._refuse(f"schema version {version} is newer than this code supports ({SCHEMA_VERSION})",
                               "upgrade cityfed on this node")
        if version == 0:
            # a ledger's tables and its schema version are written in one transaction: tables without a
            # version (even one named releases) are another program's
            other = tables - {"sqlite_sequence"}
            if other:
                raise self._refuse(
                    f"is an SQLite database but not a privacy ledger (tables {sorted(tables - {'sqlite_sequence'})})",
                    "choose another ledger path")

    @contextmanager
    def _connect(self, *, init: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._fail("cannot open", exc) from exc
        try:
            try:
                con.row_factory = sqlite3.Row
                con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                if init:
                    mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    if str(mode).lower() not in ("wal", "delete"):
                        con.execute("PRAGMA journal_mode = DELETE")
                con.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as exc:
                raise self._fail("cannot open", exc) from exc
            yield con
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction (rolled back on error)."""
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._fail("cannot start a write transaction", exc) from exc
            try:
                yield con
                con.execute("COMMIT")
            except BaseException as exc:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise self._fail("write failed", exc) from exc
                raise

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._connect() as con:
            try:
                return con.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._fail("read failed", exc) from exc

    def _init_schema(self, con: sqlite3.Connection) -> None:
        try:
            con.execute("BEGIN IMMEDIATE")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            try:  # checked read-only by _check_existing too; again here, under the write lock
                self._check_version(version, tables)
            except LedgerError:
                con.execute("ROLLBACK")
                raise
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 1:  # every version-1 row was a round of DP-SGD
                con.execute("ALTER TABLE releases ADD COLUMN mechanism TEXT NOT NULL DEFAULT 'dp-sgd'")
                con.execute("ALTER TABLE releases ADD COLUMN replay INTEGER NOT NULL DEFAULT 0 CHECK (replay IN (0, 1))")
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            con.execute(_CENTRAL_SCHEMA)
            con.execute(_COUNTS_SCHEMA)
            con.execute(_META_SCHEMA)
            # the ledger's identity: a node key is bound to the ledger it spends against (clients.cli)
            con.execute("INSERT OR IGNORE INTO ledger_meta (key, value) VALUES ('ledger-id', ?)", (uuid.uuid4().hex,))
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise self._fail("cannot initialise", exc) from exc

    # -- writes --------------------------------------------------------------------------
    def begin(
        self,
        release: Release,
        *,
        max_epsilon: float | None = None,
        delta: float | None = None,
        run_cap: tuple[Sequence[str], int] | None = None,
    ) -> int:
        """Record ``release`` as 'pending' before training starts.

        Parameters
        ----------
        release : Release
            The release about to be produced.
        max_epsilon, delta : float, optional
            When both are given, the budget is checked inside the same write transaction
            (atomic against other processes): if the epsilon at ``delta`` including this
            release (by the ledger's accountant, over the whole history) would exceed
            ``max_epsilon``, nothing is written and :class:`BudgetExceededError` is raised.
        run_cap : (mechanisms, cap), optional
            A per-run cap checked in the same transaction: when the release's run already has
            ``cap`` counted (pending or committed) releases of ``mechanisms`` from the site,
            nothing is written and :class:`RunCapExceededError` is raised. Two processes of
            one node that both read the run's count before either wrote cannot both pass it.

        Returns
        -------
        int
            Id of the new row, to pass to :meth:`commit` or :meth:`abort`.
        """
        if not isinstance(release, Release):
            raise TypeError(f"begin() expects a Release, got {type(release).__name__}")
        if (max_epsilon is None) != (delta is None):
            raise ValueError("give both max_epsilon and delta, or neither")
        if release.accountant is not None and release.accountant != self.accountant:
            raise LedgerError(
                f"privacy ledger {str(self.path)!r}: release names accountant {release.accountant!r} but the "
                f"ledger accounts with {self.accountant!r} (open it with the policy's accountant).")
        now = _now()
        with self._write() as con:
            other = con.execute(
                "SELECT department FROM releases WHERE site = ? AND department != ? LIMIT 1",
                (release.site, release.department),
            ).fetchone()
            if other is not None:
                raise LedgerError(
                    f"privacy ledger {str(self.path)!r}: site {release.site!r} belongs to department "
                    f"{other[0]!r}, not {release.department!r} (one accountant per department site)."
                )
            if run_cap is not None:
                mechanisms, cap = tuple(run_cap[0]), int(run_cap[1])
                done = int(con.execute(
                    "SELECT COUNT(*) FROM releases WHERE site = ? AND run_id = ? AND status IN ('pending', 'committed')"
                    f" AND mechanism IN ({', '.join('?' * len(mechanisms))})",
                    (release.site, release.run_id, *mechanisms)).fetchone()[0])
                if done >= cap:
                    raise RunCapExceededError(
                        f"privacy ledger {str(self.path)!r}: run {release.run_id!r} already has {done} "
                        f"{'/'.join(mechanisms)} release(s) from site {release.site!r} (cap {cap})", done, cap)
            if max_epsilon is not None:
                hist = self._history(con, release.site)
                hist.append((float(release.noise_multiplier), float(release.sample_rate), int(release.steps)))
                eps = composed_epsilon(hist, float(delta), self.accountant)
                if eps > max_epsilon and not math.isfinite(eps):
                    reason = (f"site {release.site!r} has a non-private release (a round trained without DP, allowed "
                              f"by policy require_dp = false): its epsilon is infinite, so no release stays within "
                              f"max_epsilon {max_epsilon:g}.")
                    raise BudgetExceededError(f"privacy ledger {str(self.path)!r}: {reason}", reason)
                if eps > max_epsilon:
                    reason = (f"release would bring site {release.site!r} to epsilon {eps:.4g} > max_epsilon "
                              f"{max_epsilon:g} (delta {delta:g}, {self.accountant.upper()} accountant).")
                    raise BudgetExceededError(f"privacy ledger {str(self.path)!r}: {reason}", reason)
            cur = con.execute(
                "INSERT INTO releases (site, department, run_id, round, noise_multiplier, sample_rate,"
                " steps, planned_steps, delta, accountant, status, reason, created_at, updated_at, mechanism, replay)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL, ?, ?, ?, ?)",
                (
                    release.site,
                    release.department,
                    release.run_id,
                    int(release.round),
                    float(release.noise_multiplier),
                    float(release.sample_rate),
                    int(release.steps),
                    int(release.steps),
                    float(release.delta),
                    self.accountant,
                    now,
                    now,
                    release.mechanism,
                    int(bool(release.replay)),
                ),
            )
            return int(cur.lastrowid)

    def _finish(self, release_id: int, status: str, *, steps: int | None, reason: str | None) -> None:
        with self._write() as con:
            row = con.execute("SELECT status FROM releases WHERE id = ?", (int(release_id),)).fetchone()
            if row is None:
                raise LedgerError(f"privacy ledger {str(self.path)!r}: no release with id {release_id}.")
            if row[0] != "pending":
                raise LedgerError(
                    f"privacy ledger {str(self.path)!r}: release {release_id} is {row[0]!r}; only a "
                    f"'pending' release can become {status!r}."
                )
            if steps is None:
                con.execute(
                    "UPDATE releases SET status = ?, reason = ?, updated_at = ? WHERE id = ?",
                    (status, reason, _now(), int(release_id)),
                )
            else:
                con.execute(
                    "UPDATE releases SET status = ?, reason = ?, steps = ?, updated_at = ? WHERE id = ?",
                    (status, reason, int(steps), _now(), int(release_id)),
                )

    def commit(self, release_id: int, *, steps: int | None = None) -> None:
        """Mark a pending release as released.

        Parameters
        ----------
        release_id : int
            Id returned by :meth:`begin`.
        steps : int, optional
            Actual number of noisy steps taken, when it differs from the planned count.

        Raises
        ------
        LedgerError
            Unknown id, or the release is not pending.
        """
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be an int >= 0 (got {steps!r})")
        self._finish(release_id, "committed", steps=steps, reason=None)

    def abort(self, release_id: int, reason: str) -> None:
        """Mark a pending release as aborted: NOTHING left the node.

        Only for rounds that failed before any result was sent (e.g. an exception before
        the reply). The row is kept for audit and no longer counts toward epsilon. If in
        doubt, :meth:`commit` instead: over-counting is safe, under-counting is not.

        Raises
        ------
        LedgerError
            Unknown id, or the release is not pending (a committed release can never be
            aborted).
        """
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("abort() needs a non-empty reason for the audit trail")
        self._finish(release_id, "aborted", steps=None, reason=reason)

    def released_count(self, release: Release, split: str, exact: int, draw, *, max_epsilon: float,
                       delta: float, delta_of=None) -> tuple[int, bool]:
        """The noised count of ``site``'s ``split`` records: the one released before, or a new release.

        In one write transaction: when this site, split and exact count already have a released
        value it is returned (nothing new leaves: the same value again). Otherwise the budget is
        checked with ``release`` (a ``gaussian-count`` release) added, ``draw()`` gives the noised
        value, and the release (committed: it leaves with the reply that asked for it) and the value
        are recorded together.

        Parameters
        ----------
        release : Release
            The ``gaussian-count`` release (noise multiplier = the noise std in records, q = 1, 1 step).
        split : str
            ``"train"`` or ``"test"``.
        exact : int
            The exact count (stays in the ledger, on the node).
        draw : callable
            ``draw() -> int``: the noised count (>= 1).
        max_epsilon, delta : float
            The budget check, as in :meth:`begin`.
        delta_of : callable, optional
            ``delta_of(value) -> float``: the delta recorded with the committed release, once the
            value is known (the site's delta follows its released count); default ``release.delta``.

        Returns
        -------
        (int, bool)
            The value, and whether this call released it (False: released before).

        Raises
        ------
        BudgetExceededError
            A new release would pass ``max_epsilon``.
        """
        if release.mechanism != "gaussian-count":
            raise ValueError(f"released_count() records a gaussian-count release (got {release.mechanism!r})")
        with self._write() as con:
            row = con.execute("SELECT value FROM released_counts WHERE site = ? AND split = ? AND exact = ?",
                              (release.site, split, int(exact))).fetchone()
            if row is not None:
                return int(row[0]), False
        rid = self.begin(release, max_epsilon=max_epsilon, delta=delta)
        value = int(draw())
        if value < 1:
            self.abort(rid, "the drawn count was below 1")
            raise ValueError(f"a released count must be >= 1 (got {value})")
        with self._write() as con:
            row = con.execute("SELECT value FROM released_counts WHERE site = ? AND split = ? AND exact = ?",
                              (release.site, split, int(exact))).fetchone()
            if row is not None:  # another process released it meanwhile: its value is the one that leaves
                con.execute("UPDATE releases SET status = 'aborted', reason = ?, updated_at = ? WHERE id = ?",
                            ("another process released this count first", _now(), rid))
                return int(row[0]), False
            row_delta = float(delta_of(value)) if delta_of is not None else float(release.delta)
            con.execute("UPDATE releases SET status = 'committed', delta = ?, updated_at = ? WHERE id = ?",
                        (row_delta, _now(), rid))
            con.execute("INSERT INTO released_counts (site, split, exact, value, release_id, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?)", (release.site, split, int(exact), value, rid, _now()))
        return value, True

    # -- reads ---------------------------------------------------------------------------
    @staticmethod
    def _history(con: sqlite3.Connection, site: str) -> list[tuple[float, float, int]]:
        rows = con.execute(
            "SELECT noise_multiplier, sample_rate, steps FROM releases"
            " WHERE site = ? AND status IN ('pending', 'committed') ORDER BY id",
            (site,),
        ).fetchall()
        return [(float(r[0]), float(r[1]), int(r[2])) for r in rows]

    def history(self, site: str) -> list[tuple[float, float, int]]:
        """Counted (pending and committed) releases of ``site`` as ``(noise, q, steps)``.

        This is exactly the ``history`` of an Opacus ``RDPAccountant``, in release order.
        """
        with self._connect() as con:
            try:
                return self._history(con, site)
            except sqlite3.Error as exc:
                raise self._fail("read failed", exc) from exc

    def epsilon(self, site: str, delta: float, accountant: str | None = None) -> float:
        """Epsilon spent by ``site`` at ``delta`` over all counted releases (0.0 when none).

        Pending releases count (conservative). Computed by ``accountant`` (default: the
        ledger's) over :meth:`history`, all rows whatever accountant they were recorded under.
        """
        return composed_epsilon(self.history(site), delta, accountant or self.accountant)

    def projected_epsilon(self, site: str, release: Release, *more: Release, accountant: str | None = None) -> float:
        """Epsilon of ``site`` if ``release`` (and ``more``) were added, at ``release.delta``."""
        hist = self.history(site)
        for r in (release, *more):
            hist.append((float(r.noise_multiplier), float(r.sample_rate), int(r.steps)))
        return composed_epsilon(hist, release.delta, accountant or self.accountant)

    def run_epsilon(self, site: str, run_id: str, delta: float, accountant: str | None = None) -> float:
        """Epsilon of the releases run ``run_id`` obtained from ``site`` (:meth:`run_history`), at ``delta``."""
        return composed_epsilon(self.run_history(site, run_id), delta, accountant or self.accountant)

    def run_history(self, site: str, run_id: str) -> list[tuple[float, float, int]]:
        """Counted releases (any mechanism) that run ``run_id`` obtained from ``site``, as ``(noise, q, steps)``."""
        rows = self._read(
            "SELECT noise_multiplier, sample_rate, steps FROM releases WHERE site = ? AND run_id = ?"
            " AND status IN ('pending', 'committed') ORDER BY id",
            (site, run_id),
        )
        return [(float(r[0]), float(r[1]), int(r[2])) for r in rows]

    def has_round(self, site: str, run_id: str, round: int, mechanism: str = "dp-sgd") -> bool:
        """Whether ``run_id`` already obtained a counted ``mechanism`` release of ``round`` from ``site``."""
        rows = self._read(
            "SELECT 1 FROM releases WHERE site = ? AND run_id = ? AND round = ? AND mechanism = ?"
            " AND status IN ('pending', 'committed') LIMIT 1",
            (site, run_id, int(round), mechanism),
        )
        return bool(rows)

    def count(self, site: str, run_id: str, mechanism: str) -> int:
        """Counted (pending or committed) releases of ``mechanism`` that run ``run_id`` obtained from ``site``."""
        rows = self._read(
            "SELECT COUNT(*) FROM releases WHERE site = ? AND run_id = ? AND mechanism = ?"
            " AND status IN ('pending', 'committed')",
            (site, run_id, mechanism),
        )
        return int(rows[0][0])

    def ledger_id(self) -> str:
        """This ledger's identity: a random id made with the file (a copy or a restored backup keeps it)."""
        return str(self._read("SELECT value FROM ledger_meta WHERE key = 'ledger-id'")[0][0])

    def site_releases(self, site: str) -> int:
        """How many counted (pending or committed) releases of ``site`` the ledger holds, every run and mechanism."""
        rows = self._read("SELECT COUNT(*) FROM releases WHERE site = ? AND status IN ('pending', 'committed')", (site,))
        return int(rows[0][0])

    def has_released_count(self, site: str, split: str, exact: int) -> bool:
        """Whether ``site``'s ``split`` count of ``exact`` records was released already (:meth:`released_count`)."""
        rows = self._read("SELECT 1 FROM released_counts WHERE site = ? AND split = ? AND exact = ? LIMIT 1",
                          (site, split, int(exact)))
        return bool(rows)

    def counts(self, site: str | None = None, split: str | None = None) -> list[dict]:
        """The released record counts (:meth:`released_count`), oldest first, as plain dicts.

        Keys: ``site, split, exact, value, release_id, created_at``. ``exact`` is the node's own
        figure (never sent); ``value`` is what its replies carry.
        """
        sql, params = "SELECT site, split, exact, value, release_id, created_at FROM released_counts", []
        where = [(c, v) for c, v in (("site", site), ("split", split)) if v is not None]
        if where:
            sql += " WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
            params = [v for _, v in where]
        return [dict(r) for r in self._read(sql + " ORDER BY release_id", tuple(params))]

    def releases(self, site: str | None = None) -> list[dict]:
        """Audit listing: every row (any status), oldest first, as plain dicts.

        Keys: ``id, site, department, run_id, round, noise_multiplier, sample_rate, steps,
        planned_steps, delta, accountant, status, reason, created_at, updated_at, mechanism, replay``
        (timestamps are ISO-8601 UTC).
        """
        if site is None:
            rows = self._read("SELECT * FROM releases ORDER BY id")
        else:
            rows = self._read("SELECT * FROM releases WHERE site = ? ORDER BY id", (site,))
        return [dict(r) for r in rows]

    def runs(self, site: str) -> list[str]:
        """Run ids that asked ``site`` for a release (any status), in order of first use."""
        rows = self._read(
            "SELECT run_id FROM releases WHERE site = ? GROUP BY run_id ORDER BY MIN(id)", (site,)
        )
        return [r[0] for r in rows]

    # -- central DP (claims, not releases of this node's budget) ----------------------------
    def record_central(self, *, site: str, department: str, run_id: str, round: int, clipping_norm_asked: float,
                       clipping_norm_applied: float, claimed: dict | None = None) -> int:
        """Record that ``site`` sent a clipped update to round ``round`` of central-DP run ``run_id``.

        The row never counts toward this node's epsilon (its guarantee is its own DP-SGD rows);
        ``claimed`` holds what the coordinator said (keys ``noise_multiplier``, ``sample_rate``,
        ``epsilon``, ``delta``, ``accountant``; missing ones stored as NULL), kept as a claim.

        Returns
        -------
        int
            The row id.
        """
        c = dict(claimed or {})

        def num(key):
            v = c.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

        with self._write() as con:
            cur = con.execute(
                "INSERT INTO central_claims (site, department, run_id, round, clipping_norm_asked, clipping_norm_applied,"
                " claimed_noise_multiplier, claimed_sample_rate, claimed_epsilon, claimed_delta, claimed_accountant,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (str(site), str(department), str(run_id), int(round), float(clipping_norm_asked),
                 float(clipping_norm_applied), num("noise_multiplier"), num("sample_rate"), num("epsilon"), num("delta"),
                 None if c.get("accountant") is None else str(c["accountant"]), _now()))
            return int(cur.lastrowid)

    def central_claims(self, site: str | None = None) -> list[dict]:
        """Central-DP participations (:meth:`record_central`), oldest first, as plain dicts."""
        if site is None:
            rows = self._read("SELECT * FROM central_claims ORDER BY id")
        else:
            rows = self._read("SELECT * FROM central_claims WHERE site = ? ORDER BY id", (site,))
        return [dict(r) for r in rows]

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r}, accountant={self.accountant!r})"

