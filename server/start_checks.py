"""``fl-server start``'s checks before anything is written or started, and the SuperLink's arguments.

One job: refuse a start that cannot work, with the option and the fix (exit 2): TLS files
missing, not signed by ``--ca``, not covering the address the local commands dial or with a
``--key`` that is not ``--cert``'s (:func:`check_tls_files`); an ``--admin-net`` that is not a
network (:func:`admin_networks`); a second ``fl-server start`` on one state dir
(:func:`check_not_started`, :func:`take_start_lock`); a ``--host``/``--port`` that cannot be
listened on (:func:`check_port_free`). Then ``flower-superlink``'s arguments (:func:`superlink_args`).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from server.errors import CliError

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_host(host: str, option: str = "--host") -> str:
    """Refuse a ``--host`` that is not an IP address literal or a host name (no port, no scheme).

    ``fl-server start`` and ``fl-server console`` check it before anything else that uses it
    (the TLS and port checks would otherwise blame the certificate or the network). An IPv6
    literal may be written bare (``::1``) or in brackets (``[::1]``).

    Parameters
    ----------
    host : str
        The value given.
    option : str
        The option that gave it, for the message.

    Returns
    -------
    str
        ``host``, unchanged.

    Raises
    ------
    CliError
        Code 2, naming the option, the value and the fix.
    """
    import ipaddress

    text = host.strip()
    if not text:
        raise CliError(f"{option} is empty; fix: pass an IP address of this machine (e.g. {option} 127.0.0.1, or "
                       f"{option} 0.0.0.0 for every interface) or its host name")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", text)
    if scheme:
        rest = re.split(r"[/:]", scheme.group(2).strip("[]").split("]")[0], maxsplit=1)[0] or "127.0.0.1"
        raise CliError(f"{option} {host}: has a scheme ({scheme.group(1)}://); {option} takes an address or host "
                       f"name only; fix: {option} {rest} (and the port, if any, as --port)")
    try:
        ipaddress.ip_address(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
        return host
    except ValueError:
        pass
    with_port = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:\[\]]+):([0-9]+)", text)
    if with_port:
        addr, port = (with_port.group(1), with_port.group(2)) if with_port.group(1) else with_port.group(3, 4)
        raise CliError(f"{option} {host}: has a port; {option} takes an address or host name only and the port is "
                       f"its own option; fix: {option} {addr} --port {port}")
    if re.fullmatch(r"[0-9.]+", text):
        raise CliError(f"{option} {host}: not an IP address (four numbers 0 to 255 separated by dots) and not a "
                       f"host name; fix: pass an IP address of this machine (`ip -brief address` lists them; e.g. "
                       f"{option} 127.0.0.1, or {option} 0.0.0.0 for every interface) or its host name")
    labels = text.removesuffix(".").split(".")
    if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise CliError(f"{option} {host}: not an IP address or a host name (a host name is letters, digits and '-' "
                       f"in dot-separated parts, e.g. coord.city.example); fix: pass an IP address of this machine "
                       f"(`ip -brief address` lists them; e.g. {option} 127.0.0.1) or its host name")
    return host


def admin_networks(admin_net: list[str], host: str) -> list:
    """The networks ``fl-server start`` lets use the Control/Runtime APIs.

    Always loopback (``127.0.0.1/32``, ``::1/128``) and the address the other ``fl-server``
    commands on the coordinator dial (:func:`_admin_address`, when ``--host`` is an IP address),
    plus each ``--admin-net``: without them those commands would be refused (HTTP 403).

    Raises
    ------
    CliError
        An ``--admin-net`` item that is not an IP network (code 2).
    """
    import ipaddress

    from server.guard import DEFAULT_ADMIN_NETS, parse_networks

    try:
        given = parse_networks(admin_net)
    except ValueError as exc:
        raise CliError(f"--admin-net: {exc}; fix: pass a CIDR such as 10.20.0.0/16, or an IP address") from None
    for net in given:
        if net.prefixlen < (8 if net.version == 4 else 16):  # a /0 lets every address launch runs: the guard is off
            raise CliError(f"--admin-net {net} allows {net.num_addresses:.3g} addresses to launch runs and register "
                           f"nodes (a network wider than /{8 if net.version == 4 else 16}), which turns the control-plane "
                           "guard off; fix: list the coordinator operators' own network, e.g. --admin-net "
                           "10.20.0.0/16 (never the departments' networks)", 2)
    own = list(DEFAULT_ADMIN_NETS)
    dialled = _admin_address(host, 1).rsplit(":", 1)[0].strip("[]")
    try:
        own.append(str(ipaddress.ip_network(dialled)))
    except ValueError:  # a host name: the commands dial it, its address is not known here
        pass
    return list(dict.fromkeys([*parse_networks(own), *given]))


def check_cert_in_date(cert: Path, option: str = "--cert", restart: str = "the coordinator") -> None:
    """Refuse a TLS certificate that is expired or not yet valid (``fl-server start``'s ``--cert``,
    ``fl-server console``'s ``--certfile``).

    Parameters
    ----------
    cert : Path
        The PEM certificate (its first certificate is the server's).
    option : str
        The option that gave it, for the message.
    restart : str
        What to restart with a new certificate, for the fix.

    Raises
    ------
    CliError
        Code 2, naming the option, the file, the date and the fix.
    """
    from privacy import pki

    try:
        leaf = pki.load_certificates(Path(cert), "certificate", "pass the server.crt from `fl-pki server-cert`")[0]
    except pki.PKIError as exc:
        raise CliError(f"{option}: {exc}") from None
    problem = pki.validity_problem(leaf, restart=restart)
    if problem:
        raise CliError(f"{option} {cert}: {problem}")


def check_tls_key(cert: Path, key: Path) -> None:
    """Refuse a ``--key`` that is not the private key of ``--cert``.

    Raises
    ------
    CliError
        Code 2: not a PEM private key (e.g. a certificate), encrypted, or another key pair's.
    """
    from cryptography import x509

    from privacy.pki import private_key_problem

    fix = "pass the server.key that `fl-pki server-cert` wrote next to this --cert"
    leaf = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    problem = private_key_problem(key, leaf, f"--cert {cert}")
    if problem:
        more = ", or the certificate issued for this key" if problem.startswith("does not belong") else ""
        raise CliError(f"--key {key}: {problem}; fix: {fix} (unencrypted, mode 0600){more}")


#: ``fl-server start`` holds an exclusive lock on this file in the state dir (it holds the owner's PID).
LOCK_FILE = "fl-server.lock"


def _second_start(state_dir: Path, holder: str) -> CliError:
    return CliError(f"--state-dir {state_dir}: another `fl-server start` (pid {holder}) runs the coordinator of this "
                    f"state dir; a second one would run a second SuperLink on its state.db and take its "
                    f"coordinator.json; fix: use the running one (every fl-server command with --state-dir "
                    f"{shlex.quote(str(state_dir))} "
                    f"talks to it), stop it first (kill -TERM {holder}, or `systemctl stop` its unit), or give this "
                    "one another --state-dir")


def check_not_started(state_dir: Path) -> None:
    """Refuse when another ``fl-server start`` holds ``<state-dir>/fl-server.lock`` (nothing is written).

    Raises
    ------
    CliError
        Code 2, naming the other process's PID and the fix.
    """
    import fcntl

    try:
        fh = open(Path(state_dir) / LOCK_FILE)  # noqa: SIM115 - closed below
    except OSError:  # no lock file (or no state dir yet): nobody holds it
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _second_start(state_dir, fh.read().strip() or "?") from None


def take_start_lock(state_dir: Path):
    """Lock ``<state-dir>/fl-server.lock`` for this process (one ``fl-server start`` per state dir).

    The lock is released when the returned file is closed or this process ends (a killed
    ``fl-server start`` leaves no stale lock); the file holds this process's PID.

    Returns
    -------
    file object
        Keep it open as long as the coordinator runs.

    Raises
    ------
    CliError
        Code 2 when another ``fl-server start`` holds it.
    """
    from privacy.safe_cli import pid_lock

    fh, holder = pid_lock(Path(state_dir) / LOCK_FILE)
    if fh is None:
        raise _second_start(state_dir, holder)
    return fh


def check_port_free(host: str, port: int) -> None:
    """Refuse a ``--host``/``--port`` that cannot be listened on now (in use, or not an address of this machine).

    ``fl-server start`` and ``fl-server console`` both check their address with it.

    Raises
    ------
    CliError
        Code 2, naming the options and the fix (for the port in use: what to stop or change; for
        an address that is not this machine's or a name that does not resolve: --host).
    """
    import errno

    from server.console import bind_error

    exc = bind_error(host, port)
    if exc is None:
        return
    problem = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        fix = (f"stop what uses the port (e.g. another coordinator or console: `ss -ltnp 'sport = :{port}'` shows "
               "it), or choose another --port")
    elif exc.errno == errno.EACCES:
        fix = "choose a --port above 1023 (lower ones need root or CAP_NET_BIND_SERVICE)"
    else:  # EADDRNOTAVAIL, a name that does not resolve (socket.gaierror), ...
        fix = "pass an address of this machine as --host (`ip -brief address` lists them), or its host name"
    raise CliError(f"--host {host} --port {port}: cannot listen there ({problem}); fix: {fix}")


def _admin_address(host: str, port: int) -> str:
    h = "127.0.0.1" if host in ("0.0.0.0", "::", "", "localhost", "127.0.0.1") else host
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


def superlink_args(*, host: str, port: int, state_dir: Path, ca: Path | None, cert: Path | None, key: Path | None,
                   insecure: bool) -> list[str]:
    """``flower-superlink`` arguments for ``fl-server start`` (without the program name).

    TLS + ``--enable-supernode-auth`` unless ``insecure``; always ``--database
    <state-dir>/state.db`` and ``--disable-runtime-dependency-installation``.
    """
    args = ["--host", host, "--port", str(port), "--database", str(state_dir / "state.db"),
            "--disable-runtime-dependency-installation"]
    if insecure:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                 "--enable-supernode-auth"]
    return args


def check_tls_files(ca: Path | None, cert: Path | None, key: Path | None, host: str,
                    port: int) -> tuple[Path, Path, Path]:
    """``fl-server start``'s TLS checks: all three given and readable, --cert signed by --ca and
    covering the address the local commands dial, --key its private key.

    Returns
    -------
    tuple of Path
        ``(ca, cert, key)``, resolved.

    Raises
    ------
    CliError
        Code 2, naming the option and the fix.
    """
    missing = [f for f, v in (("--ca", ca), ("--cert", cert), ("--key", key)) if v is None]
    if missing:
        raise CliError(f"refusing to start without TLS: {', '.join(missing)} not given; fix: create them with "
                       "`fl-pki init` and `fl-pki server-cert`, then pass --ca ca.crt --cert server.crt --key "
                       "server.key (or --insecure for a throwaway local test only)")
    ca, cert, key = (Path(p).expanduser().resolve() for p in (ca, cert, key))
    for flag, p in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if not p.is_file() or not os.access(p, os.R_OK):
            raise CliError(f"{flag} {p}: file missing or unreadable; fix: pass the file from `fl-pki` "
                           "(check the path and permissions)")
    from privacy import pki

    check_cert_in_date(cert)  # the console checks its --certfile with it too
    try:
        pki.verify_server_cert(ca, cert)
    except pki.PKIError as exc:
        raise CliError(f"--cert: {exc}") from None
    admin = _admin_address(host, port).rsplit(":", 1)[0].strip("[]")
    try:
        pki.verify_server_cert(ca, cert, admin)
    except pki.PKIError:
        raise CliError(f"--cert {cert} does not cover {admin}: the fl-server commands on this machine (register, "
                       f"run, nodes, stop) dial {admin} and would fail TLS. Fix: reissue it with `fl-pki "
                       f"server-cert ... --san {shlex.quote(admin)}` next to the names departments dial") from None
    check_tls_key(cert, key)
    return ca, cert, key
