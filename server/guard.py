"""Control/Runtime API guard for the Flower 1.42 SuperLink (used by ``fl-server start``).

Flower 1.42 serves the Fleet, Control and Runtime APIs from ONE FastAPI/uvicorn app on ONE
``--host/--port`` (the SuperLink's HTTP API entry; see :mod:`flower_compat.superlink`).
Departments must reach the Fleet API, so that port is reachable from their machines; the
open-source Control API (start runs, register nodes, ...) has no account authentication and
``/v1/runtime/acquire-task`` is unauthenticated in subprocess isolation. Without a guard,
anyone who can reach the Fleet port could launch a run or register a node.

:class:`ControlPlaneGuard` is a pure ASGI middleware installed as the outermost layer through
the SuperLink's middleware extension hook (named and wired only in :mod:`flower_compat.superlink`). The rule is an allow-list by path:
``/v1/fleet/*`` and ``/health`` are public; every other path (Control, Runtime, ``/docs``,
``/openapi.json``) is refused with HTTP 403 unless the TCP peer address is in an admin
network (default: loopback only). The SuperExec that the SuperLink starts reaches the
Runtime API over 127.0.0.1, so it keeps working.

Limits: the hook is internal to flwr (the compat layer's ``superlink`` seam,
:mod:`flower_compat.superlink`, wires it and checks it at start-up); the peer address is the TCP
peer (behind a proxy every request comes from the proxy's address). Use a path-filtering
reverse proxy or firewall as well (see docs/DEPLOYMENT.md).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable, Sequence

#: Path prefixes any peer may use (the department nodes' Fleet API).
PUBLIC_PREFIXES = ("/v1/fleet/",)
#: Exact paths any peer may use.
PUBLIC_EXACT = ("/health",)
#: Networks allowed to use the Control and Runtime APIs when none are configured.
DEFAULT_ADMIN_NETS = ("127.0.0.1/32", "::1/128")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
log = logging.getLogger("cityfed.guard")


def parse_networks(specs: Iterable[str]) -> list[IPNetwork]:
    """Parse admin networks given as CIDRs or single addresses.

    Parameters
    ----------
    specs : iterable of str
        E.g. ``["127.0.0.1/32", "10.20.0.0/16", "::1"]``; items may themselves be
        comma-separated.

    Returns
    -------
    list of ip_network

    Raises
    ------
    ValueError
        Naming the item that is not an IP network.
    """
    nets: list[IPNetwork] = []
    for spec in specs:
        for item in str(spec).split(","):
            item = item.strip()
            if not item:
                continue
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"admin network {item!r} is not an IP address or CIDR (e.g. 10.20.0.0/16)") from None
    return nets


def is_public_path(path: str) -> bool:
    """Whether ``path`` may be used by any peer (Fleet API and health check)."""
    return path in PUBLIC_EXACT or any(path.startswith(p) for p in PUBLIC_PREFIXES)


def is_admin_peer(client: Sequence | None, networks: Sequence[IPNetwork]) -> bool:
    """Whether an ASGI ``scope["client"]`` (host, port) lies in one of ``networks``.

    IPv4-mapped IPv6 peers (``::ffff:10.0.0.1``) are compared as IPv4; a missing or
    unparsable peer (e.g. a Unix socket) is not an admin.
    """
    if not client:
        return False
    try:
        ip = ipaddress.ip_address(str(client[0]).split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)


class ControlPlaneGuard:
    """ASGI middleware: Control/Runtime/docs only from admin networks; Fleet from anyone.

    Parameters
    ----------
    app : ASGI application
        The SuperLink's FastAPI app (or the next middleware).
    networks : sequence of ip_network, optional
        Admin networks; default :data:`DEFAULT_ADMIN_NETS`.
    """

    def __init__(self, app, networks: Sequence[IPNetwork] | None = None):
        self.app = app
        self.networks = list(networks) if networks is not None else parse_networks(DEFAULT_ADMIN_NETS)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = scope.get("path", "")
            if not is_public_path(path) and not is_admin_peer(scope.get("client"), self.networks):
                log.warning("refused %s from %s: control plane is admin-only", path, scope.get("client"))
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"detail": "forbidden: control plane is not reachable from this address"}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def install_guard(networks: Sequence[IPNetwork] | None = None) -> None:
    """Register :class:`ControlPlaneGuard` as the outermost SuperLink middleware.

    Must be called in the SuperLink's process before it builds its app (i.e. before
    ``flower_superlink()``). Idempotent.

    Parameters
    ----------
    networks : sequence of ip_network, optional
        Admin networks; default loopback only.
    """
    from starlette.middleware import Middleware

    from flower_compat.superlink import add_outer_middleware

    nets = list(networks) if networks is not None else parse_networks(DEFAULT_ADMIN_NETS)
    add_outer_middleware(Middleware(ControlPlaneGuard, networks=nets))


def guard_installed_in_superlink() -> bool:
    """Whether the SuperLink's middleware list (what ``create_app`` uses) starts with the guard.

    Guards against a Flower upgrade that stops calling the hook: ``fl-server start`` refuses
    to start when this is false.
    """
    from flower_compat.superlink import outer_middleware_class

    return outer_middleware_class() is ControlPlaneGuard
