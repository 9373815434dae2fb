"""``fl-sim run``: a whole department federation on one machine (Flower Simulation Engine).

The ServerApp and ClientApp are the deployment ones; only the transport differs. Each
department site is one virtual SuperNode (1 CPU each by default); each node keeps its own
ledger file under ``RUN_DIR/ledgers/`` and applies the department's policy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

from clients.app import build_client_app
from citydata import load_department
from server.app import build_server_app

ROOT = Path(__file__).resolve().parents[1]


class SimulationArgumentError(ValueError):
    """A :func:`simulate` argument that does not fit (sites, engine): names it, never a record (shown by the CLIs)."""


def default_policy(department: str) -> Path:
    """The example policy shipped for a department (``examples/policies/<dept>.toml``)."""
    return ROOT / "examples" / "policies" / f"{department}.toml"


def wait_for_nodes(grid, expected: int, *, timeout_s: float = 600.0, sleep=time.sleep, clock=time.monotonic) -> int:
    """Wait until ``expected`` nodes are registered on ``grid`` (at most ``timeout_s``).

    Flower's Simulation Engine registers its virtual nodes in one thread while the ServerApp
    already runs in another, so the first round would sample only the nodes registered so far
    (a 1,000-node run sampled 699; a 100,000-node run with 1 % sampled drew round 1 from the
    first nodes registered).

    Returns
    -------
    int
        The number of nodes registered when the wait ended; fewer than ``expected`` only when
        the timeout passed first (then a warning names both numbers).
    """
    t0 = clock()
    while True:
        count = len(list(grid.get_node_ids()))
        if count >= expected:
            return count
        if clock() - t0 >= timeout_s:
            logging.getLogger("cityfed.simulation").warning(
                "only %d of %d simulated nodes registered after %.0f s; the first round samples from those",
                count, expected, timeout_s)
            return count
        sleep(0.2)


def after_registration(server_app, expected: int, timeout_s: float = 600.0):
    """A ServerApp that runs ``server_app`` once ``expected`` nodes are registered (:func:`wait_for_nodes`)."""
    from flwr.serverapp import ServerApp

    outer = ServerApp()

    @outer.main()
    def _main(grid, context) -> None:
        wait_for_nodes(grid, expected, timeout_s=timeout_s)
        server_app(grid, context)

    return outer


def inprocess_run_id(ledger_dir: Path) -> str:
    """The run ID of a fresh in-process run: ``sim``, or ``sim-2``, ``sim-3``... where the ledgers know it.

    The nodes account per run ID (their target epsilon, personalisation once per run), and a
    simulation's ledgers stay in its folder: a second run into the same folder must not pass for
    the first, which would find its target spent and train with overwhelming noise. (Flower's
    Simulation Engine draws a new run ID per launch; a resumed run keeps its checkpoint's.)
    """
    from privacy.ledger import PrivacyLedger

    used: set[str] = set()
    for path in sorted(Path(ledger_dir).glob("*.sqlite")):
        used.update(str(r["run_id"]) for r in PrivacyLedger(path).releases())
    if "sim" not in used:
        return "sim"
    n = 2
    while f"sim-{n}" in used:
        n += 1
    return f"sim-{n}"


#: How long :func:`stop_on_signal` gives Ray to shut down before the process exits anyway (seconds).
RAY_SHUTDOWN_GRACE_S = 10.0
#: What :func:`stop_on_signal` says stays after Ctrl-C or SIGTERM (the innermost :func:`interrupt_hint`).
_STOP_HINTS = ["the checkpoint of the last finished round stays (fl-sim run --resume continues the run)"]


@contextlib.contextmanager
def interrupt_hint(text: str):
    """While inside, a Ray run stopped by Ctrl-C or SIGTERM says ``text`` about what stays (``fl-sim compare``'s own).

    Parameters
    ----------
    text : str
        E.g. ``"the comparison in OUT is incomplete (run the command again with --overwrite)"``.
    """
    _STOP_HINTS.append(str(text))
    try:
        yield
    finally:
        _STOP_HINTS.pop()


@contextlib.contextmanager
def stop_on_signal():
    """Ctrl-C (SIGINT) or SIGTERM ends a Ray simulation at once: Ray is shut down and the process exits.

    Flower's engine blocks the main thread in ``Thread.join()``, which a signal delivered to one of
    the other threads (Ray's, Flower's) does not interrupt, so Ctrl-C was never acted on: the run
    went on, or hung. Here the signal's byte reaches a watcher thread through
    :func:`signal.set_wakeup_fd`, whichever thread the kernel delivered it to; the watcher says so
    on standard error, shuts Ray down (at most :data:`RAY_SHUTDOWN_GRACE_S`) and exits with 130
    (SIGINT) or 143 (SIGTERM). The checkpoint of the last finished round stays (it is written
    atomically): ``fl-sim run --resume`` continues the run. Outside the main thread this does nothing.
    """
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    stopping = threading.Event()

    def watch() -> None:
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in (signal.SIGINT, signal.SIGTERM) and not stopping.is_set():
                    stopping.set()
                    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
                    print(f"\nfl-sim: interrupted by {name}: stopping Ray; {_STOP_HINTS[-1]}", file=sys.stderr, flush=True)
                    # the engine's threads now log every actor Ray takes down as an ERROR with a traceback:
                    # expected after a stop, and only noise next to the message above
                    logging.getLogger("flwr").disabled = True
                    done = threading.Thread(target=_ray_shutdown, daemon=True)
                    done.start()
                    done.join(RAY_SHUTDOWN_GRACE_S)
                    print("\x1b[?25h", end="", file=sys.stderr, flush=True)  # the progress display hid the cursor
                    os._exit(143 if signum == signal.SIGTERM else 130)

    def on_signal(signum, frame) -> None:  # runs only when the main thread gets to it; the watcher acts anyway
        pass

    # an ignored signal (a background job's SIGINT) stays ignored; one whose handler C code installed
    # (getsignal: None) is left alone too, since it could not be put back
    previous = {s: h for s in (signal.SIGINT, signal.SIGTERM)
                if (h := signal.getsignal(s)) is not signal.SIG_IGN and h is not None}
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for s in previous:
        signal.signal(s, on_signal)
    watcher = threading.Thread(target=watch, name="fl-sim-signal-watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(old_fd)
        os.close(w)  # the watcher reads EOF and ends
        watcher.join(1.0)
        os.close(r)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended an in-process simulation; ``exit_code`` 130 or 143, as on Ray.

    A :class:`KeyboardInterrupt`, so that everything that cleans up after Ctrl-C (temporary files,
    the ledgers' open transactions) does so after SIGTERM too. ``fl-sim run`` and ``fl-sim compare``
    say so (its message: ``interrupted by SIGTERM``) and exit with its ``exit_code``.
    """

    def __init__(self, name: str, exit_code: int):
        super().__init__(f"interrupted by {name}")
        self.exit_code = exit_code


@contextlib.contextmanager
def stop_in_process():
    """Ctrl-C (SIGINT) or SIGTERM ends an in-process simulation with a message and 130 / 143.

    The in-process engine trains on the main thread, so a Python signal handler runs there: SIGTERM
    raises :class:`RunInterrupted` (its default action killed the process with no word to the user,
    nor any clean-up), and Ctrl-C's :class:`KeyboardInterrupt` becomes one. The checkpoint of the last
    finished round is written atomically, so ``fl-sim run --resume`` continues the run. Outside the
    main thread, or where SIGTERM is ignored or handled by C code, the signal handling is left as it is.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame) -> None:
        raise RunInterrupted("SIGTERM", 143)

    previous = signal.getsignal(signal.SIGTERM)
    mine = previous is not signal.SIG_IGN and previous is not None  # None: C code's handler, which cannot be put back
    if mine:
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise RunInterrupted("Ctrl-C (SIGINT)", 130) from None
    finally:
        if mine:
            signal.signal(signal.SIGTERM, previous)


def _ray_shutdown() -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def show_data_warnings(cfg: dict, sites: list[str]) -> bool:
    """Build every site's data as its node will, so that each data-quality warning is shown once, here.

    The caller then sets :data:`citydata.base.DATA_WARNINGS_SHOWN_ENV` for the Ray actors (they
    inherit the environment) and the ServerApp, so that they do not show them again: each actor
    loads the department's data for the nodes it plays. A site that cannot be built is left to its
    node, which reports it as it would without this.

    Returns
    -------
    bool
        Whether every site was built (and its warnings shown).
    """
    try:
        ds = load_department(cfg["department"], cfg.get("data") or None, seed=int(cfg.get("data-seed", 0) or 0))
        for site in sites:
            ds.site_data(site)
    except Exception:  # noqa: BLE001 - the node reports its own data error, in its own words
        return False
    return True


def simulate(run_config: dict, *, engine: str = "ray", cpus_per_client: float = 1.0, on_round=None,
             only_sites: list[str] | None = None, ray_address: str | None = None,
             gpus_per_client: float = 0.0) -> dict:
    """Run one federation in simulation and return its ``results.json`` content.

    Parameters
    ----------
    run_config : dict
        ServerApp run config (see :mod:`server.app`) plus ``policy`` (TOML) and
        ``ledger-dir``; ``department`` picks the sites (one virtual node per site).
    engine : {"ray", "inprocess"}
        Flower's Ray simulation engine, or the in-process grid (no Ray; same apps).
    cpus_per_client : float
        Ray resources per virtual client.
    ray_address : str, optional
        Ray engine: run on this existing Ray cluster (``HOST:PORT`` or ``auto``; see
        :mod:`simulations.ray_cluster`) instead of starting Ray on this machine.
    gpus_per_client : float
        Ray engine: GPUs per virtual client (a fraction shares one); such clients train on CUDA.
    only_sites : list of str, optional
        In-process engine only: run with these sites' nodes alone (e.g. leave-one-site-out);
        each keeps its partition id among all the department's sites.

    Returns
    -------
    dict
        The run's ``results.json`` content.

    Raises
    ------
    SimulationArgumentError
        A ``ValueError``: ``only_sites`` names a site the department lacks, or is given with ``engine="ray"``.
    privacy.ledger_partition.LedgerPartitionError
        A ``ValueError``: the ledger folder accounts for other nodes (the department's sites, or another
        partition into virtual sites) than this run's, before any node trains.

    Sets ``CITYFED_DP_SEED_FROM_JOB=1`` in this process unless it is set: DP-SGD's noise then
    follows the job's seed, so a simulation is reproducible (see :func:`privacy.dp.dp_seeds`).
    """
    if only_sites is not None and engine != "inprocess":  # before anything is created
        raise SimulationArgumentError("only_sites needs engine='inprocess'")
    from privacy import SEED_FROM_JOB_ENV

    # one machine, no adversary: DP noise follows the job's seed so a simulation is reproducible
    # (inherited by Ray's workers; a department node never has it, see privacy.dp.dp_seeds)
    os.environ.setdefault(SEED_FROM_JOB_ENV, "1")
    from server.app import settings

    settings(run_config)  # a bad value is a RunConfigError naming the key, before any folder is created
    cfg = dict(run_config)
    run_dir = Path(cfg["run-dir"])
    cfg.setdefault("ledger-dir", str(run_dir / "ledgers"))
    cfg.setdefault("policy", str(default_policy(cfg["department"])))
    # every simulated node and the coordinator's central data split the records by the run's seed,
    # as the non-federated baselines do (citydata: health's test split is a seeded draw per hospital)
    cfg.setdefault("data-seed", int(cfg.get("seed", 0) or 0))
    cfg.setdefault("central-data-seed", cfg["data-seed"])
    settings(cfg)  # and the seeds derived from it
    from privacy.ledger_partition import check_partition, record_partition

    # the ledger folder's nodes (the department's sites, or one partition into virtual sites) and no others
    check_partition(Path(cfg["ledger-dir"]), cfg["department"], cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_partition(Path(cfg["ledger-dir"]), cfg["department"], cfg)
    nvirtual = int(cfg.get("virtual-sites", 0) or 0)
    sites = ([f"virtual-{k}" for k in range(nvirtual)] if nvirtual
             else load_department(cfg["department"], cfg.get("data") or None).sites)
    if engine == "inprocess":
        import torch

        from server.app import run_federation

        # one process plays every node, one after another: 1 intra-op thread per node, as a
        # Ray worker with 1 CPU has (with more, small models slow down badly when cores are shared)
        torch.set_num_threads(max(1, int(cpus_per_client)))
        from simulations.inprocess import InProcessGrid

        nodes = [{"partition-id": i, "num-partitions": len(sites)} for i in range(len(sites))]
        if only_sites is not None:
            unknown = sorted(set(only_sites) - set(sites))
            if unknown:
                raise SimulationArgumentError(f"only_sites: unknown site(s) {unknown}; the department's sites are {sites}")
            nodes = [{**n, "site": sites[n["partition-id"]]} for n in nodes if sites[n["partition-id"]] in only_sites]
        grid = InProcessGrid(build_client_app(), nodes, cfg)
        with stop_in_process():
            return run_federation(grid, cfg, run_id=cfg.get("run-id") or inprocess_run_id(Path(cfg["ledger-dir"])),
                                  on_round=on_round)
    from flower_compat.dispatch import install

    install()  # one walk over the queued messages per sweep instead of one per node (see its docstring)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's notice about a default it may change in a later version (GPU visibility of actors that ask for
    # no GPU); the pinned Ray's current behaviour is the one we run with, so the notice is not shown
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    from citydata.base import DATA_WARNINGS_SHOWN_ENV

    # each site's data warnings once, here, not again from every Ray actor that plays a node
    shown = not nvirtual and show_data_warnings(cfg, sites)
    from simulations.ray_cluster import backend_config

    backend = backend_config(cpus_per_client, gpus_per_client, ray_address)
    from flower_compat.simulation import run_apps

    # Flower's engine entry, not the deprecated run_simulation wrapper (why: flower_compat.simulation)
    server_app = after_registration(build_server_app(cfg, on_round=on_round), len(sites))
    saved = os.environ.get(DATA_WARNINGS_SHOWN_ENV)
    if shown:
        os.environ[DATA_WARNINGS_SHOWN_ENV] = "1"  # inherited by the Ray actors started below
    try:
        with stop_on_signal():
            run_apps(server_app, build_client_app(cfg), len(sites), backend)
    finally:
        if saved is None:
            os.environ.pop(DATA_WARNINGS_SHOWN_ENV, None)
        else:
            os.environ[DATA_WARNINGS_SHOWN_ENV] = saved
    return json.loads((run_dir / "results.json").read_text())
