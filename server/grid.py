"""Grid wrappers: fast polling (deployment) and reply deadlines derived from measured times.

**Fast polling.**
In Flower 1.42 the deployment grid (Flower's HTTP grid; :mod:`flower_compat.grid` holds what cityfed adapts of it) implements
``send_and_receive`` as ``push_messages`` followed by a ``pull_messages`` loop that sleeps
**3 s** between pulls. Every train and every evaluate step of a round therefore waits up to
3 s after the last reply has arrived. :class:`FastPollGrid` keeps the same semantics
(same timeout rule, same returned replies) with a short sleep, using only the public
``Grid`` methods, so no Flower patch is needed.

Only deployment grids are wrapped (:func:`fast_poll`): the simulation grids deliver
replies in their own ``send_and_receive``.

**Deadlines.** :class:`DeadlineGrid` gives every message exchange of a run (train, evaluate,
each SecAgg+ stage) a deadline from the run config's ``round-timeout`` (:class:`RoundTimeout`):
a fixed number of seconds, or ``"auto"`` (the default): the first exchange of each kind gets a
generous but bounded deadline (``first``, 600 s), every later one ``factor`` (5) times the
slowest reply of the last :data:`RECENT` (3) exchanges of that kind, at least ``floor`` (30 s)
and at most ``max`` (= ``first``). A node that has not answered when the deadline passes, or that the SuperLink
reports unavailable, is named with the reason (:attr:`Exchange.missing`), and the exchange goes
on with the others.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from flower_compat.grid import NODE_UNAVAILABLE, SUPERLINK_NODE_ID, fast_http_pulls, is_deployment_grid, is_simulation_grid
from flower_compat.secagg import RECORD_KEY_CONFIGS, Key

#: Seconds between two ``pull_messages`` calls while replies are outstanding.
POLL_INTERVAL_S = 0.1
#: Environment variable overriding the poll interval (0: do not wrap, keep Flower's 3 s loop).
POLL_ENV = "CITYFED_GRID_POLL_S"
#: Bounds of ``$CITYFED_GRID_POLL_S`` other than 0 (seconds): below the lower one the ServerApp
#: would hammer the SuperLink with pulls; above the upper one every exchange of every round
#: would wait that long after its last reply (Flower's own loop sleeps 3 s).
POLL_MIN_S, POLL_MAX_S = 0.01, 60.0


class FastPollGrid(Grid):
    """Delegate to ``inner`` except for ``send_and_receive``, which polls every ``interval`` s.

    Parameters
    ----------
    inner : Grid
        The grid Flower gave the ServerApp.
    interval : float
        Sleep between pulls while replies are outstanding (seconds, > 0).
    """

    def __init__(self, inner: Grid, interval: float = POLL_INTERVAL_S):
        if interval <= 0:
            raise ValueError(f"poll interval must be > 0 seconds, got {interval}")
        self.inner = inner
        self.interval = float(interval)
        #: Seconds from push to each reply of the last exchange, by destination node
        #: (read by :class:`DeadlineGrid` to measure reply times).
        self.last_arrivals: dict[int, float] = {}

    def set_run(self, run) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def get_nodes(self):  # noqa: D102
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies every :attr:`interval` seconds.

        Returns when every message has a reply or, if ``timeout`` is given, when it has
        passed (the replies received so far are returned, as in Flower's grids).
        """
        messages = list(messages)
        pushed = list(self.inner.push_messages(messages))
        t0 = time.monotonic()
        dst = {mid: getattr(getattr(m, "metadata", None), "dst_node_id", None) for mid, m in zip(pushed, messages) if mid}
        msg_ids = set(dst)
        end = t0 + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        self.last_arrivals = {}
        while msg_ids and (timeout is None or time.monotonic() < end):
            got = list(self.inner.pull_messages(msg_ids))
            replies.extend(got)
            for m in got:
                node = dst.get(m.metadata.reply_to_message_id)
                if node is not None:
                    self.last_arrivals[int(node)] = time.monotonic() - t0
            msg_ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if msg_ids:
                time.sleep(self.interval)
        return replies

    def __getattr__(self, name):
        # anything else a Flower version adds (close, ...) goes to the real grid
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def poll_interval_from_env(default: float = POLL_INTERVAL_S) -> float:
    """The deployment ServerApp's poll interval: ``$CITYFED_GRID_POLL_S`` where set, else ``default``.

    ``fl-server start`` checks it before the SuperLink starts (its ServerApp processes inherit
    the variable); :func:`fast_poll` reads it again when a run begins, before round 1.

    Parameters
    ----------
    default : float
        Seconds used where the variable is unset.

    Returns
    -------
    float
        Seconds between pulls (:data:`POLL_MIN_S` to :data:`POLL_MAX_S`), or 0: keep Flower's
        own 3 s loop (a measurement switch).

    Raises
    ------
    server.errors.CliError
        Exit status 2: the variable is set but is not a number, not finite, negative, or
        outside the bounds; the message names the variable, its value and the fix.
    """
    from server.errors import CliError

    raw = os.environ.get(POLL_ENV)
    if raw is None:
        return float(default)
    fix = (f"fix: set {POLL_ENV} to the seconds between two pulls for replies, {POLL_MIN_S:g} to {POLL_MAX_S:g} "
           f"(e.g. {POLL_INTERVAL_S:g}, the default), or 0 to keep Flower's own 3 s loop, or unset it")
    try:
        value = float(raw)
    except ValueError:
        raise CliError(f"{POLL_ENV}={raw!r}: not a number of seconds; {fix}") from None
    if not math.isfinite(value):
        raise CliError(f"{POLL_ENV}={raw!r}: not a finite number; {fix}")
    if value == 0:
        return 0.0
    if value < 0:
        raise CliError(f"{POLL_ENV}={raw!r}: negative; {fix}")
    if not POLL_MIN_S <= value <= POLL_MAX_S:
        raise CliError(f"{POLL_ENV}={raw!r}: outside {POLL_MIN_S:g} to {POLL_MAX_S:g} seconds; {fix}")
    return value


def fast_poll(grid: Grid, interval: float = POLL_INTERVAL_S) -> Grid:
    """Wrap a deployment grid in :class:`FastPollGrid`; return any other grid unchanged.

    Parameters
    ----------
    grid : Grid
        What Flower passed to the ServerApp's main.
    interval : float
        Poll interval in seconds; the environment variable ``CITYFED_GRID_POLL_S`` (in the
        SuperLink's environment, inherited by the ServerApp process) overrides it
        (:func:`poll_interval_from_env`), and 0 there disables the wrapper (Flower's 3 s
        loop, for measurements). Simulation grids do not read it.

    Raises
    ------
    server.errors.CliError
        A deployment grid and a bad ``CITYFED_GRID_POLL_S`` (before any message is sent).
    """
    if not is_deployment_grid(grid) or isinstance(grid, FastPollGrid):
        return grid
    interval = poll_interval_from_env(interval)
    if interval == 0:  # measurement switch: keep Flower's own 3 s loop
        return grid
    # a reply is listed before its objects are stored: retry after 20 ms, not Flower's 1 s
    fast_http_pulls()
    return FastPollGrid(grid, interval)


# --------------------------------------------------------------------------- deadlines

#: Defaults of ``round-timeout = "auto"`` (seconds, except ``factor``); ``max`` defaults to ``first``.
AUTO_DEFAULTS = {"first": 600.0, "factor": 5.0, "floor": 30.0}
#: ``auto`` scales the slowest reply of this many latest exchanges of a kind (a slow first,
#: cold round stops counting after that many rounds).
RECENT = 3
_AUTO_KEYS = ("first", "factor", "floor", "max")
_AUTO_HELP = ("a number of seconds > 0 (every exchange gets that deadline) or 'auto', optionally with settings: "
              "'auto:first=600,factor=5,floor=30,max=600'")

#: Exchange kinds and how reasons name them. SecAgg+ stages are Flower's stage names.
KIND_LABELS = {
    "train": "train", "evaluate": "evaluate", "nodes": "connected nodes",
    "setup": "SecAgg+ setup", "share_keys": "SecAgg+ share-keys",
    "collect_masked_vectors": "SecAgg+ collect-masked-vectors (training)", "unmask": "SecAgg+ unmask",
}


def _secs(x: float) -> str:
    """Seconds for a reason: ``42``, ``8.4``, ``0.35``."""
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


@dataclass(frozen=True)
class RoundTimeout:
    """The run config's ``round-timeout``, parsed: how long each message exchange may take.

    Parameters
    ----------
    fixed : float, optional
        A number of seconds given in the run config: every exchange (train, evaluate, each
        SecAgg+ stage, waiting for connected nodes) gets this deadline. None for ``auto``.
    first : float
        ``auto``: deadline of the first exchange of each kind in a run (nothing measured yet:
        it covers the app install, the node's first imports and DP noise calibration).
    factor : float
        ``auto``: a later exchange gets ``factor`` times the slowest reply measured in the
        last :data:`RECENT` exchanges of its kind (in this run, across resumes).
    floor : float
        ``auto``: shortest deadline (slow networks, a busy node).
    cap : float
        ``auto``: longest deadline after the first (``max`` in the run config; default
        ``first``).
    """

    fixed: float | None = None
    first: float = AUTO_DEFAULTS["first"]
    factor: float = AUTO_DEFAULTS["factor"]
    floor: float = AUTO_DEFAULTS["floor"]
    cap: float = AUTO_DEFAULTS["first"]

    @classmethod
    def parse(cls, value) -> RoundTimeout:
        """Parse a ``round-timeout`` value: seconds (number or numeric string) or ``auto[:k=v,...]``.

        Raises
        ------
        ValueError
            Naming what is wrong and the accepted forms.
        """
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected {_AUTO_HELP}")
        if isinstance(value, str):
            text = value.strip()
            try:
                value = float(text)
            except ValueError:
                return cls._parse_auto(text)
        seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError("seconds must be a finite number > 0; fix: e.g. round-timeout=120, "
                             "or round-timeout=auto (deadlines from measured times)")
        return cls(fixed=seconds)

    @classmethod
    def _parse_auto(cls, text: str) -> RoundTimeout:
        head, _, tail = text.partition(":")
        if head.strip().lower() != "auto":
            raise ValueError(f"expected {_AUTO_HELP}")
        got: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in tail.split(","))):
            key, eq, raw = (x.strip() for x in item.partition("="))
            if key not in _AUTO_KEYS or not eq:
                raise ValueError(f"unknown 'auto' setting {item!r} (known: {', '.join(_AUTO_KEYS)}; e.g. "
                                 "'auto:first=600,factor=5,floor=30')")
            try:
                got[key] = float(raw)
            except ValueError:
                raise ValueError(f"'auto' setting {key!r}: expected a number, got {raw!r}") from None
            if not math.isfinite(got[key]) or got[key] <= 0:
                raise ValueError(f"'auto' setting {key!r}: must be a finite number > 0, got {raw!r}")
        first = got.get("first", AUTO_DEFAULTS["first"])
        rule = cls(first=first, factor=got.get("factor", AUTO_DEFAULTS["factor"]),
                   floor=got.get("floor", AUTO_DEFAULTS["floor"]), cap=got.get("max", first))
        if rule.factor < 1:
            raise ValueError(f"'auto' setting 'factor' must be >= 1 (got {rule.factor:g}): a deadline shorter than the "
                             "time nodes took before would drop nodes that answer as fast as before")
        if not rule.floor <= rule.cap:
            raise ValueError(f"'auto' settings: floor ({rule.floor:g} s) must not exceed max ({rule.cap:g} s; max "
                             "defaults to first); fix: lower floor or raise first/max")
        return rule

    def describe(self) -> str:
        """One line for logs and documentation."""
        if self.fixed is not None:
            return f"round-timeout = {self.fixed:g} s per exchange"
        return (f"round-timeout = auto: first exchange of each kind {self.first:g} s, then {self.factor:g} x the slowest "
                f"reply of the last {RECENT} of its kind, within [{self.floor:g}, {self.cap:g}] s")


class Deadlines:
    """Deadline of each exchange kind of one run, from a :class:`RoundTimeout` and measured reply times.

    Parameters
    ----------
    rule : RoundTimeout
    measured : dict, optional
        ``{kind: [{"round": r, "seconds": s}, ...]}``: the slowest reply of each of the last
        :data:`RECENT` exchanges per kind; updated in place (the strategy keeps it in the run's
        history, so a resumed run keeps it).
    bounded : bool
        False: ``auto`` sets no deadline (Flower's simulation engine, whose simulated nodes
        cannot vanish and whose large runs may take longer than ``first``); a fixed
        ``round-timeout`` always applies.
    """

    def __init__(self, rule: RoundTimeout, measured: dict | None = None, *, bounded: bool = True):
        self.rule = rule
        self.measured = measured if measured is not None else {}
        self.bounded = bounded
        # kinds exchanged since this run (re)started: a resumed run is a new Flower run, whose nodes
        # start its app again (tens of seconds), so its first exchange of each kind gets ``first``
        # whatever the checkpointed history measured before the stop
        self._since_start: set[str] = set()

    def deadline(self, kind: str) -> tuple[float | None, str]:
        """``(seconds or None, basis)`` for the next exchange of ``kind``; the basis explains the number."""
        r = self.rule
        if r.fixed is not None:
            return r.fixed, f"round-timeout = {r.fixed:g} s"
        if not self.bounded:
            return None, "none (simulation)"
        recent = self.measured.get(kind)
        if not recent:
            return r.first, f"the {r.first:g} s allowed for a run's first {KIND_LABELS.get(kind, kind)} exchange"
        if kind not in self._since_start:
            return r.first, (f"the {r.first:g} s allowed for the first {KIND_LABELS.get(kind, kind)} exchange of a "
                             "resumed run (its nodes start the run's app again)")
        m = max(reversed(recent), key=lambda x: float(x["seconds"]))  # the slowest; the latest of equals
        raw = r.factor * float(m["seconds"])
        basis = f"{r.factor:g} x round {m['round']}'s {_secs(float(m['seconds']))} s"
        if raw < r.floor:
            return r.floor, f"the {r.floor:g} s floor ({basis} is less)"
        if raw > r.cap:
            return r.cap, f"the {r.cap:g} s maximum ({basis} is more)"
        return round(raw, 3), basis

    def record(self, kind: str, rnd: int | None, seconds: float) -> None:
        """Note that an exchange of ``kind`` in round ``rnd`` had its slowest reply after ``seconds``."""
        self._since_start.add(kind)
        recent = self.measured.setdefault(kind, [])
        recent.append({"round": rnd, "seconds": round(float(seconds), 3)})
        del recent[:-RECENT]


@dataclass
class Exchange:
    """One ``send_and_receive`` through a :class:`DeadlineGrid`.

    Attributes
    ----------
    kind : str
        ``train``, ``evaluate`` or a SecAgg+ stage (``setup``, ``share_keys``,
        ``collect_masked_vectors``, ``unmask``).
    round : int or None
    deadline : float or None
        Seconds the coordinator waited at most; ``basis`` says where the number comes from.
    basis : str
    seconds : float
        How long the exchange took.
    nodes : list of int
        Destination nodes.
    replied : dict
        Node -> seconds until its reply (replies and error replies from the node itself).
    errors : dict
        Node -> its error reply's ``(code, reason)`` (refusals, failures).
    missing : dict
        Node -> why it gave no reply (deadline passed, or the SuperLink reports it unavailable).
    """

    kind: str
    round: int | None
    deadline: float | None
    basis: str
    seconds: float = 0.0
    nodes: list[int] = field(default_factory=list)
    replied: dict[int, float] = field(default_factory=dict)
    errors: dict[int, tuple[int, str]] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)

    @property
    def label(self) -> str:  # noqa: D102
        return KIND_LABELS.get(self.kind, self.kind)


def exchange_kind(messages: list[Message], default_round: int | None = None) -> tuple[str, int | None]:
    """``(kind, round)`` of an exchange: the SecAgg+ stage of its messages, else their type."""
    m = messages[0]
    kind = str(m.metadata.message_type).split(".")[0]
    cfg = m.content.config_records.get(RECORD_KEY_CONFIGS)
    if cfg is not None and Key.STAGE in cfg:
        kind = str(cfg[Key.STAGE])
    rnd = default_round
    if str(m.metadata.group_id).isdigit():
        rnd = int(m.metadata.group_id)
    else:
        for rec in m.content.config_records.values():
            if "server-round" in rec:
                rnd = int(rec["server-round"])
                break
    return kind, rnd


def peer_error(reply) -> tuple[int, str]:
    """A node's error reply as ``(code, reason)``, its reason escaped and cut (:func:`contract.text.peer_text`).

    The reason is text the node chose: raw, it reached the log, results.json and the audit log with
    terminal sequences and line breaks in it.
    """
    from contract.text import peer_text

    return int(reply.error.code), peer_text(str(reply.error.reason))


def unavailable_reason(error, seconds: float, label: str) -> str:
    """Why the SuperLink answered for a node (its error reply), in words."""
    from contract.text import peer_text

    if int(error.code) == NODE_UNAVAILABLE:
        return (f"unavailable after {_secs(seconds)} s in {label}: the SuperLink reports the node offline (its "
                "SuperNode signed off, or its heartbeat stopped: process gone or unreachable)")
    return f"no reply to {label}: the SuperLink reports the message or its reply unavailable ({peer_text(str(error.reason))})"


class DeadlineGrid(Grid):
    """Delegate to ``inner``; give every ``send_and_receive`` the deadline of its kind; record what happened.

    The ``timeout`` a caller passes (Flower's strategy loop, the SecAgg+ workflow) is replaced
    by :meth:`Deadlines.deadline` of the exchange's kind. Error replies the SuperLink makes for
    an unavailable node (sender = the SuperLink) are not returned: like a node that misses its
    deadline, the node appears in :attr:`Exchange.missing` with the reason. Every exchange is
    appended to :attr:`exchanges`.

    Parameters
    ----------
    inner : Grid
        The run's grid. It may offer ``clock()`` and ``sleep(s)`` (simulated time in tests;
        default: ``time.monotonic``/``time.sleep``) and ``last_arrivals`` (node -> seconds
        until its reply in the last exchange, :class:`FastPollGrid`); without it an
        exchange's time is measured as a whole.
    deadlines : Deadlines
    """

    def __init__(self, inner: Grid, deadlines: Deadlines):
        self.inner = inner
        self.deadlines = deadlines
        self.exchanges: list[Exchange] = []
        self.seen_nodes: dict[int, int | None] = {}  # node -> last round it was sent a message
        self.clock = getattr(inner, "clock", time.monotonic)
        self.sleep = getattr(inner, "sleep", time.sleep)

    def set_run(self, run) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send ``messages`` and wait for replies until the deadline of their kind (``timeout`` is ignored).

        Returns the nodes' replies (error replies of nodes included); the outcome per node
        is in ``self.exchanges[-1]``.
        """
        messages = list(messages)
        if not messages:
            return []
        last_round = self.exchanges[-1].round if self.exchanges else None
        kind, rnd = exchange_kind(messages, last_round)
        limit, basis = self.deadlines.deadline(kind)
        ex = Exchange(kind, rnd, limit, basis, nodes=[int(m.metadata.dst_node_id) for m in messages])
        self.exchanges.append(ex)
        for n in ex.nodes:
            self.seen_nodes[n] = rnd
        if hasattr(self.inner, "last_arrivals"):
            self.inner.last_arrivals = {}
        t0 = self.clock()
        replies = list(self.inner.send_and_receive(messages, timeout=limit))
        ex.seconds = self.clock() - t0
        arrivals = dict(getattr(self.inner, "last_arrivals", None) or {})
        by_id = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages if m.metadata.message_id}
        wanted = set(ex.nodes)
        out: list[Message] = []
        for reply in replies:
            src = int(reply.metadata.src_node_id)
            if src in wanted and src not in ex.replied:
                ex.replied[src] = arrivals.get(src, ex.seconds)
                if reply.has_error():
                    ex.errors[src] = peer_error(reply)
                out.append(reply)
                continue
            node = by_id.get(reply.metadata.reply_to_message_id)
            if node is not None and reply.has_error() and (src == SUPERLINK_NODE_ID or src not in wanted):
                ex.missing[node] = unavailable_reason(reply.error, arrivals.get(node, ex.seconds), ex.label)
        for n in ex.nodes:
            if n not in ex.replied and n not in ex.missing:
                if limit is not None and ex.seconds >= limit - 0.05:  # (float rounding)
                    ex.missing[n] = f"no reply to {ex.label} within {_secs(limit)} s; deadline = {basis}"
                else:  # the grid gave up first (a simulated failure, a message it could not deliver)
                    ex.missing[n] = f"no reply to {ex.label} (the exchange ended after {_secs(ex.seconds)} s without it)"
        if ex.replied and (not ex.missing or arrivals):
            self.deadlines.record(kind, rnd, max(ex.replied.values()))
        return out

    def await_nodes(self, needed: int, rnd: int | None, wait: bool = True) -> tuple[list[int] | None, str]:
        """Wait until at least ``needed`` nodes are connected, at most the ``nodes`` deadline.

        ``wait=False`` looks once (an optional step, such as evaluation, is skipped at once).

        Returns
        -------
        (node_ids, why)
            The connected nodes, or None and the reason (naming the nodes seen earlier in the
            run that are not connected) when the deadline passed first.
        """
        limit, basis = self.deadlines.deadline("nodes")
        t0 = self.clock()
        while True:
            ids = [int(n) for n in self.inner.get_node_ids()]
            waited = self.clock() - t0
            if len(ids) >= needed:
                self.deadlines.record("nodes", rnd, waited)
                return ids, ""
            if not wait or limit is not None and waited >= limit:
                gone = [f"node {n} (last sent a message in round {r})" for n, r in self.seen_nodes.items() if n not in ids]
                waiting = f"; waited {_secs(waited)} s (deadline = {basis})" if wait else ""
                return None, (f"{len(ids)} node(s) connected, the round needs {needed}{waiting}"
                              + (f"; not connected: {', '.join(gone)}" if gone else ""))
            self.sleep(min(1.0, limit - waited) if limit is not None else 1.0)

    def pinned(self, node_ids: list[int]) -> Grid:
        """This grid, but listing exactly ``node_ids`` as connected (Flower samples from them without waiting)."""
        return _Pinned(self, list(node_ids))

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class _Pinned(Grid):
    """A :class:`DeadlineGrid` whose ``get_node_ids`` returns a fixed list."""

    def __init__(self, grid: DeadlineGrid, node_ids: list[int]):
        self.grid, self.node_ids = grid, node_ids

    def set_run(self, run) -> None:  # noqa: D102
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.node_ids)

    def push_messages(self, messages):  # noqa: D102
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: D102
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        return self.grid.send_and_receive(messages, timeout=timeout)


def deadline_grid(grid: Grid, round_timeout, measured: dict | None = None) -> DeadlineGrid:
    """Wrap ``grid`` in a :class:`DeadlineGrid` for the run config's ``round-timeout``.

    ``auto`` sets no deadline on Flower's simulation grid (see :class:`Deadlines`).
    """
    if isinstance(grid, DeadlineGrid):
        return grid
    rule = RoundTimeout.parse(round_timeout)
    return DeadlineGrid(grid, Deadlines(rule, measured, bounded=not is_simulation_grid(grid)))
