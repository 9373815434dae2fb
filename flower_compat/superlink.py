"""Seam ``superlink``: the SuperLink internals ``fl-server`` adapts (``server/cli.py``, ``server/guard.py``,
``server/supervisor.py``, ``server/flwr_calls.py``).

* :func:`add_outer_middleware` / :func:`outer_middleware_class`: the SuperLink's extension hook
  ``flwr.superlink.extensions.get_middleware`` (read by ``flwr/superlink/main.py:_get_middleware``
  when it builds its FastAPI app); :mod:`server.guard` puts its control-plane guard first.
* :func:`supervise_lifespan`: subclass ``flower_superlink.SuperLinkLifespan`` so that the
  coordinator's supervisor sees it start and stop; :func:`superexec_process`,
  :func:`restart_superexec` and :func:`link_state` are what ``server.supervisor``'s
  ``CoordinatorSupervisor`` then reads and does through it (the self-test checks the
  lifespan's attributes and the link state's methods).
* :func:`flower_superlink`: Flower's ``flower-superlink`` main, run in-process.
* :data:`Status`, :data:`SubStatus`: the run status names of the link state.
* :func:`list_runs_request` / :func:`list_runs_statuses`: the Control API's ``ListRuns`` protobufs
  (what ``flwr ls`` sends), so ``fl-server`` asks the coordinator without starting ``flwr``.
* :func:`list_nodes_request` / :func:`list_nodes_keys`: the Control API's ``ListNodes`` protobufs
  (what ``flwr supernode ls`` sends), read with each node's public key, which ``flwr supernode ls
  --format json`` leaves out (``fl-server register`` finds the node of a key already in use).

None of this has a public Flower API: the SuperLink is configured by command-line flags only.
"""

from __future__ import annotations

from typing import Callable, Iterator

from flwr.common.constant import Status, SubStatus

from flower_compat import register

__all__ = ["Status", "SubStatus", "add_outer_middleware", "flower_superlink", "lifespan_hook_available", "link_state",
           "list_nodes_keys", "list_nodes_request", "list_runs_request", "list_runs_statuses", "outer_middleware_class",
           "restart_superexec", "superexec_process", "supervise_lifespan"]

_FS = "flwr.superlink.cli.flower_superlink"


def flower_superlink() -> None:
    """Run Flower's ``flower-superlink`` main in this process (arguments from ``sys.argv``)."""
    from flwr.superlink.cli.flower_superlink import flower_superlink as main

    main()


def add_outer_middleware(middleware) -> None:
    """Make ``middleware`` (a ``starlette.middleware.Middleware``) the SuperLink app's outermost layer.

    Must be called in the SuperLink's process before it builds its app. Idempotent: a second
    call replaces the first one's middleware.
    """
    from flwr.superlink import extensions

    original = getattr(extensions.get_middleware, "_cityfed_original", extensions.get_middleware)

    def get_middleware():
        return (middleware, *original())

    get_middleware._cityfed_original = original  # type: ignore[attr-defined]
    extensions.get_middleware = get_middleware


def outer_middleware_class() -> type | None:
    """The class of the first middleware the SuperLink's ``create_app`` will use (``None`` when there is none)."""
    from flwr.superlink import main as superlink_main

    mws = list(superlink_main._get_middleware())  # noqa: SLF001 - the hook this seam relies on
    return getattr(mws[0], "cls", None) if mws else None


def lifespan_hook_available() -> bool:
    """Whether flwr's SuperLink exposes the lifespan :func:`supervise_lifespan` subclasses."""
    import importlib

    try:
        fs = importlib.import_module(_FS)
    except ImportError:
        return False
    cls = getattr(fs, "SuperLinkLifespan", None)
    return (cls is not None and all(hasattr(cls, a) for a in ("startup", "shutdown", "_start_superexec_if_needed"))
            and "SuperLinkLifespan" in fs._run_superlink_http_api.__code__.co_names)  # noqa: SLF001


def supervise_lifespan(on_startup: Callable[[object], None], on_shutdown: Callable[[], None]) -> None:
    """Make the SuperLink call ``on_startup(lifespan)`` after it started and ``on_shutdown()`` before it stops.

    Idempotent (a second call replaces the first one's callbacks).
    """
    import importlib

    fs = importlib.import_module(_FS)
    base = getattr(fs.SuperLinkLifespan, "_cityfed_base", fs.SuperLinkLifespan)

    class SupervisedLifespan(base):  # type: ignore[misc, valid-type]
        _cityfed_base = base

        def startup(self) -> None:
            super().startup()
            on_startup(self)

        def shutdown(self) -> None:
            on_shutdown()
            super().shutdown()

    fs.SuperLinkLifespan = SupervisedLifespan


def superexec_process(lifespan):
    """The SuperExec process a ``SuperLinkLifespan`` started (``subprocess.Popen``), or ``None``."""
    return getattr(lifespan, "superexec_process", None)


def restart_superexec(lifespan) -> None:
    """Start the lifespan's SuperExec again (after it exited), as the SuperLink does at start-up."""
    lifespan._start_superexec_if_needed()  # noqa: SLF001 - the seam


def link_state(lifespan):
    """The SuperLink's link state (``get_task_by_token``, ``get_run_status``, ``get_run_info``, ``finish_task``)."""
    return lifespan.state_factory.state()


def list_runs_request(run_id: int) -> bytes:
    """The serialised Control API ``ListRunsRequest`` for ``run_id`` (POST ``/v1/control/list-runs``)."""
    from flwr.proto.control_pb2 import ListRunsRequest

    return ListRunsRequest(run_id=int(run_id)).SerializeToString()


def list_runs_statuses(content: bytes) -> Iterator[tuple[str, str, str]]:
    """``(status, sub_status, details)`` of each run in a serialised ``ListRunsResponse``."""
    from flwr.proto.control_pb2 import ListRunsResponse

    for proto in ListRunsResponse.FromString(content).run_dict.values():
        yield proto.status.status, proto.status.sub_status, proto.status.details


def list_nodes_request() -> bytes:
    """The serialised Control API ``ListNodesRequest`` (POST ``/v1/control/list-nodes``)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    return ListNodesRequest().SerializeToString()


#: ``NodeInfo`` fields :func:`list_nodes_keys` reads.
_NODE_FIELDS = ("node_id", "status", "name", "registered_at", "unregistered_at", "public_key")


def list_nodes_keys(content: bytes) -> Iterator[dict]:
    """Each node of a serialised ``ListNodesResponse``, unregistered ones included.

    Yields
    ------
    dict
        ``node-id`` (str), ``status`` (``registered``, ``online``, ``offline``, ``unregistered``),
        ``name`` (given at registration, may be empty), ``registered-at``, ``unregistered-at``
        (ISO 8601, empty when not), ``public-key`` (PEM SubjectPublicKeyInfo bytes, as Flower
        stores the registered key).
    """
    from flwr.proto.control_pb2 import ListNodesResponse

    for info in ListNodesResponse.FromString(content).nodes_info:
        yield {"node-id": str(info.node_id), "status": info.status, "name": info.name,
               "registered-at": info.registered_at, "unregistered-at": info.unregistered_at,
               "public-key": bytes(info.public_key)}


@register("superlink")
def _self_test() -> None:
    """The SuperLink hooks, lifespan attributes, status names and Control API messages this seam uses."""
    import importlib

    from flwr.superlink import extensions
    from flwr.superlink import main as superlink_main

    assert callable(getattr(extensions, "get_middleware", None)), "flwr.superlink.extensions.get_middleware is gone"
    assert callable(getattr(superlink_main, "_get_middleware", None)), "flwr.superlink.main._get_middleware is gone"
    assert lifespan_hook_available(), f"{_FS}.SuperLinkLifespan (startup/shutdown/_start_superexec_if_needed) changed"
    fs = importlib.import_module(_FS)
    assert callable(getattr(fs, "flower_superlink", None)), f"{_FS}.flower_superlink is gone"
    init_names = fs.SuperLinkLifespan.__init__.__code__.co_names + fs.SuperLinkLifespan.startup.__code__.co_names
    for attr in ("superexec_process", "state_factory"):
        assert attr in init_names, f"SuperLinkLifespan no longer sets {attr}"
    from flwr.server.superlink.linkstate import LinkState

    missing = [m for m in ("get_task_by_token", "get_run_status", "get_run_info", "finish_task")
               if not callable(getattr(LinkState, m, None))]
    assert not missing, f"LinkState lacks {missing}"
    for name in ("FINISHED", "PENDING", "RUNNING"):
        assert hasattr(Status, name), f"Status.{name} is gone"
    for name in ("COMPLETED", "STOPPED", "FAILED"):
        assert hasattr(SubStatus, name), f"SubStatus.{name} is gone"
    assert list(list_runs_statuses(b"")) == [] and list_runs_request(1), "control_pb2.ListRuns* changed"
    from flwr.proto.control_pb2 import ListNodesResponse

    node_info = ListNodesResponse.DESCRIPTOR.fields_by_name["nodes_info"].message_type
    missing = [f for f in _NODE_FIELDS if f not in node_info.fields_by_name]
    assert not missing, f"control_pb2.ListNodesResponse's NodeInfo lacks {missing}"
    assert list(list_nodes_keys(list_nodes_request())) == [], "control_pb2.ListNodes* changed"
