"""``fl-serve``: serve a verified model package on the department's own node (FastAPI + uvicorn)."""

from __future__ import annotations

import os
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from contract.text_files import BOM_FIX, UTF8_BOM
from citydata.timestamps import DATE_FORMAT_FIX  # the fix of a bad --date-format, worded once with fl-client's

app = typer.Typer(add_completion=False, suggest_commands=False, no_args_is_help=True, help=(
    "Serve a cityfed model package (fl-sim export-model / fl-server export) on this department's node. "
    "The package's hashes are checked first (a changed file is refused). Records are validated with the same checks "
    "as training and scaled as in training (health: fixed public reference constants; traffic/utility: each request "
    "window by its own lookback): nothing is fitted to records, and nothing comes from the package or the coordinator. "
    "API: POST /predict (JSON or CSV records in "
    "the department's schema; answers in original units), GET /model (model card), GET /metrics, GET /health, "
    "GET /docs (OpenAPI). Every call but /health and the docs needs an API key: header 'X-API-Key: KEY'."))
err = Console(stderr=True, emoji=False)

#: Environment variable that may hold the API key (instead of --api-key-file).
KEY_ENV = "CITYFED_SERVE_API_KEY"


def key_file_problem(path: Path) -> str | None:
    """Why the API key file ``path`` is open to too many users (a message naming the fix), or ``None``.

    Its group may read it (``0640``, ``root:svc 0440``: one service group). Refused: a file its
    group or every user can change, and one every user can read, unless nobody can change it and
    it is not this user's (a read-only secret mount: Docker mounts secrets ``0444`` owned by
    root, where ``chmod`` cannot be done). Looser than the rule for ``fl-server console``'s token
    file (``0600`` only), which only the console itself writes and reads.
    """
    st = Path(path).stat()
    mode, q = st.st_mode & 0o777, shlex.quote(str(path))
    mine = st.st_uid == os.geteuid()
    if mode & 0o022:
        who = "every user" if mode & 0o002 else "its group"
        fix = f"chmod 600 {q} (or chmod 640 for one service group)" if mine else \
            "have its owner make it 0440 or 0400 (Kubernetes: defaultMode 0440), or mount it read-only"
        return f"{path}: {who} can change the API keys in it (mode {mode:o}); fix: {fix}"
    if mode & 0o004 and (mine or mode & 0o200):
        fix = f"chmod 600 {q} (or chmod 640 for one service group)" if mine else \
            "have its owner make it 0440 or 0400 (Kubernetes: defaultMode 0440), or mount it read-only (0444)"
        return f"{path}: every user can read the API keys in it (mode {mode:o}); fix: {fix}"
    return None


def read_keys(path: Path | None) -> list[str]:
    """API keys from a file (one per line, ``#`` comments) or ``$CITYFED_SERVE_API_KEY``.

    Raises
    ------
    typer.BadParameter
        No key anywhere, an unreadable file, a file other users can read or change
        (:func:`key_file_problem`), or a key shorter than 16 characters.
    """
    if path is not None:
        problem = key_file_problem(path) if Path(path).is_file() else None
        if problem is not None:
            raise typer.BadParameter(problem, param_hint="--api-key-file")
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise typer.BadParameter(f"{path}: cannot read ({exc.strerror}); fix: give a readable file with one key "
                                     "per line", param_hint="--api-key-file") from None
        if raw.startswith(UTF8_BOM):  # it would stay in the first key: every client's key refused (403)
            raise typer.BadParameter(f"{path}: starts with a byte-order mark (BOM), which would become part of the "
                                     f"first key; fix: {BOM_FIX}", param_hint="--api-key-file")
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise typer.BadParameter(f"{path}: not UTF-8 text (byte {exc.start}); fix: write the keys as plain text, one "
                                     "per line (`python -c 'import secrets; print(secrets.token_urlsafe(32))' > "
                                     "serve.keys`)", param_hint="--api-key-file") from None
        keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        where = str(path)
    else:
        keys = [os.environ[KEY_ENV].strip()] if os.environ.get(KEY_ENV, "").strip() else []
        where = f"${KEY_ENV}"
    if not keys:
        raise typer.BadParameter(f"no API key in {where}; fix: put a key in a file (e.g. `python -c 'import secrets; "
                                 f"print(secrets.token_urlsafe(32))' > serve.keys; chmod 600 serve.keys`) and pass "
                                 f"--api-key-file serve.keys, or set {KEY_ENV}", param_hint="--api-key-file")
    short = [k for k in keys if len(k) < 16]
    if short:
        raise typer.BadParameter(f"{where}: {len(short)} key(s) shorter than 16 characters; fix: use long random keys "
                                 "(secrets.token_urlsafe(32))", param_hint="--api-key-file")
    return keys


def build(package: Path, site: str, data: Path | None, keys: list[str], *, manifest_sha256: str | None = None,
          date_format: str | None = None, ranges: Path | None = None, personalised: Path | None = None,
          test_start: str | None = None):
    """Load and verify ``package``, build ``site``'s features from the node's data, and return the FastAPI app.

    With ``personalised``, the node's personalised model file of the package's run replaces the
    package's weights (:func:`serving.personalised.attach_personalised`).

    Raises
    ------
    serving.package.PackageError
        A damaged package, or a personalised file that does not fit it.
    serving.features.SiteError
        ``site`` is not a site of the department's records (bundled or ``data``).
    citydata.base.DataFileError
        The node's own inputs (``data``, ``ranges``, ``CITYFED_DATE_FORMAT``...) cannot be used.
    """
    from serving.app import build_app
    from serving.features import SiteFeatures
    from serving.package import load_package

    pkg = load_package(package, manifest_sha256=manifest_sha256)
    feats = SiteFeatures(pkg.department, site, data, date_format=date_format, ranges=ranges,  # --site, --data first
                         test_start=test_start)
    if personalised is not None:
        from serving.personalised import attach_personalised

        pkg = attach_personalised(pkg, personalised, site)
    feats.self_check()
    return build_app(pkg, feats, keys)


_SHA256_FIX = ("fix: copy the 64-character hash from the line 'MANIFEST.json SHA-256: ...' that `fl-server export` "
               "(or `fl-sim export-model`) printed, or leave --manifest-sha256 out")


def check_manifest_sha256(value: str | None) -> str | None:
    """Check and normalise ``--manifest-sha256``: 64 hex digits, any case, an optional ``sha256:`` prefix.

    Parameters
    ----------
    value : str or None
        The option as given; ``None`` when it was left out.

    Returns
    -------
    str or None
        The hash in lower case without prefix or spaces, or ``None``.

    Raises
    ------
    typer.BadParameter
        Not a SHA-256 (exit 2): the message names the option, the value and the fix. Checked before
        the package is read, so a typo is not reported as a replaced package.
    """
    if value is None:
        return None
    text = value.strip()
    for prefix in ("sha256:", "sha-256:"):
        if text.lower().startswith(prefix):
            text = text[len(prefix):].strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.lower()
    raise typer.BadParameter(f"{value!r} is not a SHA-256 (64 hex characters, got {len(text)} characters"
                             f"{'' if all(c in '0123456789abcdefABCDEF' for c in text) else ', not all hex'}); "
                             f"{_SHA256_FIX}", param_hint="--manifest-sha256")


def check_date_format_option(value: str | None) -> str | None:
    """Check ``--date-format`` before anything is read, as ``fl-client`` does.

    Parameters
    ----------
    value : str or None
        The option as given; ``None`` when it was left out.

    Returns
    -------
    str or None
        The value normalised by :func:`citydata.timestamps.check_date_format`.

    Raises
    ------
    typer.BadParameter
        Not a date format (exit 2): the message names the option, the value, what is wrong and the fix.
    """
    from citydata.timestamps import check_date_format

    try:
        return check_date_format(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc}; {DATE_FORMAT_FIX}", param_hint="--date-format") from None


_PACKAGE_FIX = "fix: give the package folder written by `fl-sim export-model` or `fl-server export` (its -o DIR)"


def check_package_path(package: Path) -> None:
    """Refuse a PACKAGE argument that does not exist or is not a folder (exit 2), before it is read.

    A folder that is there but holds a damaged package is :func:`serving.package.load_package`'s
    to refuse (exit 1, as the README documents).

    Raises
    ------
    typer.BadParameter
        The message names PACKAGE, the path and the fix.
    """
    path = Path(package)
    if not path.exists():
        raise typer.BadParameter(f"{path}: not found; {_PACKAGE_FIX}", param_hint="PACKAGE")
    if not path.is_dir():
        raise typer.BadParameter(f"{path}: not a folder (a package is a folder with MANIFEST.json); {_PACKAGE_FIX}",
                                 param_hint="PACKAGE")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for tests and benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_plain_http(host: str, *, tls: bool) -> None:
    """Refuse plain HTTP on an address other machines can reach, as ``fl-server console`` does.

    Parameters
    ----------
    host : str
        ``--host``; loopback (``127.0.0.1``, ``::1``, ``localhost``) is always allowed.
    tls : bool
        Whether ``--tls-cert`` and ``--tls-key`` are given (HTTPS).

    Raises
    ------
    typer.BadParameter
        Exit 2: ``host`` is not loopback and there is no TLS (the API key and the records would
        cross the network in clear), naming the fix.
    """
    from server.console import is_loopback

    if tls or is_loopback(host):
        return
    raise typer.BadParameter(f"--host {host}: not a loopback address, and without TLS the API key and the records "
                             "would cross the network in clear; fix: add --tls-cert and --tls-key (a certificate for "
                             "this host from the city CA, `fl-pki`), or serve on --host 127.0.0.1 behind a reverse "
                             "proxy that terminates TLS", param_hint="--host")


def check_port(host: str, port: int) -> None:
    """Refuse, before anything is announced, an address ``fl-serve`` cannot listen on.

    Binds ``host:port`` as uvicorn will (``SO_REUSEADDR``) and lets it go again.

    Raises
    ------
    typer.BadParameter
        The port is in use, needs privileges, or ``host`` is not an address of this machine.
    """
    import errno

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise typer.BadParameter(f"host {host!r} cannot be resolved ({getattr(exc, 'strerror', None) or exc}); fix: "
                                 "pass --host 127.0.0.1 (this machine only) or an address of this machine",
                                 param_hint="--host") from None
    family, kind, proto, _, addr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise typer.BadParameter(f"port {port} on {host} is in use (another fl-serve?); fix: pass --port N "
                                     "with a free port, or stop the program that holds it", param_hint="--port") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise typer.BadParameter(f"port {port} on {host}: permission denied (ports below 1024 need privileges); "
                                     "fix: pass --port N with N of 1024 or above", param_hint="--port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise typer.BadParameter(f"{host} is not an address of this machine; fix: pass --host 127.0.0.1 (this "
                                     "machine only), 0.0.0.0 (every interface, with --tls-cert/--tls-key) or one of its "
                                     "addresses",
                                     param_hint="--host") from None
        raise typer.BadParameter(f"cannot listen on {host} port {port} ({exc.strerror or type(exc).__name__}); fix: "
                                 "pass another --host / --port", param_hint="--port") from None


def _tls_file(path: Path, option: str, fix: str) -> None:
    """Refuse a TLS option's path that is missing, not a regular file, or unreadable (exit 2)."""
    path = Path(path)
    if not path.exists():
        raise typer.BadParameter(f"{path}: not found; fix: {fix}", param_hint=option)
    if path.is_dir():
        raise typer.BadParameter(f"{path}: is a directory, not a PEM file; fix: {fix}", param_hint=option)
    if not path.is_file():
        raise typer.BadParameter(f"{path}: is not a regular file; fix: {fix}", param_hint=option)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise typer.BadParameter(f"{path}: cannot read it ({exc.strerror or type(exc).__name__}); fix: make it readable "
                                 f"by this user, or {fix}", param_hint=option) from None


#: The fixes for the TLS options: what each file is and where it comes from.
_CERT_FIX = "pass the server certificate (PEM, e.g. server.crt of `fl-pki server-cert`)"
_KEY_FIX = "pass that certificate's own private key (PEM, unencrypted, e.g. the server.key written next to it)"


def check_tls(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Load the TLS files as uvicorn will, so that a bad one is named before anything is announced.

    Parameters
    ----------
    cert, key : Path
        ``--tls-cert`` and ``--tls-key``.
    client_ca : Path or None
        ``--client-ca``.

    Raises
    ------
    typer.BadParameter
        Exit 2, naming the option, the file and the fix: a file missing, a directory, unreadable or not
        PEM; a certificate expired or not yet valid (as ``fl-server start`` refuses it); a key that is
        not the certificate's.
    """
    import ssl

    from privacy import pki

    _tls_file(cert, "--tls-cert", _CERT_FIX)
    _tls_file(key, "--tls-key", _KEY_FIX)
    if client_ca is not None:
        _tls_file(client_ca, "--client-ca", "give the CA certificate (ca.crt of fl-pki init)")
    try:
        leaf = pki.load_certificates(Path(cert), "certificate", _CERT_FIX)[0]
    except (pki.PKIError, IndexError) as exc:
        raise typer.BadParameter(str(exc) if isinstance(exc, pki.PKIError) else f"{cert}: holds no certificate; "
                                 f"fix: {_CERT_FIX}", param_hint="--tls-cert") from None
    problem = pki.validity_problem(leaf, restart="fl-serve")
    if problem:
        raise typer.BadParameter(f"{cert}: {problem}", param_hint="--tls-cert")
    problem = pki.private_key_problem(key, leaf, f"--tls-cert {cert}")
    if problem:
        more = ", or the certificate issued for this key" if problem.startswith("does not belong") else ""
        raise typer.BadParameter(f"{key}: {problem}; fix: {_KEY_FIX}{more}", param_hint="--tls-key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise typer.BadParameter(f"{cert} / {key}: cannot be loaded as a PEM certificate and its private key "
                                 f"({getattr(exc, 'reason', None) or exc.strerror or type(exc).__name__}); fix: give "
                                 "the PEM certificate (fl-pki) with --tls-cert and its own key with --tls-key",
                                 param_hint="--tls-cert / --tls-key") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(str(client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise typer.BadParameter(f"{client_ca}: cannot be loaded as a PEM CA certificate "
                                     f"({getattr(exc, 'reason', None) or exc.strerror or type(exc).__name__}); fix: "
                                     "give the CA certificate (ca.crt of fl-pki init)", param_hint="--client-ca") from None


class ServerThread:
    """Run a FastAPI app under uvicorn in a background thread (tests, benchmarks): ``with ServerThread(app) as url:``."""

    def __init__(self, fastapi_app, host: str = "127.0.0.1", port: int | None = None, **config):
        import uvicorn

        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(fastapi_app, host=host, port=self.port, log_level="warning",
                                                    access_log=False, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError(f"uvicorn did not start on {self.url}")
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@app.command(epilog="Errors print a message naming the file, field and fix, never a traceback (it could show records); "
                    "add --debug anywhere on the command line for the full traceback (and, while serving, for a failed "
                    "request's).")
def serve(
    package: Annotated[Path, typer.Argument(help="Package folder (fl-sim export-model / fl-server export).")],
    site: Annotated[str, typer.Option("--site", "-s", help="The site this node serves (its hospital, detector or grid; "
                                      "`fl-sim datasets` lists them). Its records come from --data or the bundled data; a site "
                                      "not in them is refused (exit 2).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="The department's own records file (CSV/Parquet, as "
                                                 "for fl-client --data); default: the bundled records.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option("--api-key-file", help=f"File with the accepted API keys, one "
                                                         f"per line (default: ${KEY_ENV}).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; any other address needs --tls-cert and --tls-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8480,
    manifest_sha256: Annotated[Optional[str], typer.Option("--manifest-sha256", help="Expected SHA-256 of the "
                                                           "package's MANIFEST.json (printed by the export): refuses a "
                                                           "package replaced as a whole.")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="TLS certificate (PEM); with --tls-key the API "
                                                     "is served over HTTPS.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="TLS private key (PEM).")] = None,
    client_ca: Annotated[Optional[Path], typer.Option("--client-ca", help="CA certificate (PEM): clients must present "
                                                      "a certificate it signed (mutual TLS), in addition to the API "
                                                      "key.")] = None,
    date_format: Annotated[Optional[str], typer.Option("--date-format", help="Layout of text timestamps in --data and "
                                                       "in requests: ISO (default), DMY, MDY or a strftime pattern with the year, month and day; "
                                                       "anything else is refused (exit 2).")] = None,
    ranges: Annotated[Optional[Path], typer.Option("--ranges", help="Plausibility-range overrides (TOML), as in "
                                                   "training.")] = None,
    personalised: Annotated[Optional[Path], typer.Option("--personalised", help="Serve this node's personalised model "
                                                         "of the package's run instead of the global one: the file the "
                                                         "node kept, <ledger folder>/personalised/<department>-<site>/"
                                                         "<run id>.safetensors (fl-client: the folder of its --ledger "
                                                         "file; fl-sim run: "
                                                         "RUN_DIR/ledgers/personalised/). Refused unless its site is "
                                                         "--site and it was fine-tuned from this package's model (exit 1); a path that is "
                                                         "missing, a folder or no personalised model file: exit 2.")] = None,
    test_start: Annotated[Optional[str], typer.Option("--test-start", help="traffic/utility with --data: the test "
                                                      "start the node trains with (fl-client --test-start; or "
                                                      "CITYFED_TEST_START). The file is opened as the node opens it; "
                                                      "requests are not split.", show_default=False)] = None,
) -> None:
    """Serve PACKAGE for one site on this node: POST /predict, GET /model, /metrics, /health, /docs.

    The package's SHA-256 hashes are checked first (a changed, missing or extra file is refused). Records are validated with the same checks as a training file and scaled as in training (health: fixed public reference constants; traffic/utility: each request window normalised by its own lookback): nothing is fitted to records, and nothing comes from the package or the coordinator. Answers are in original units: probabilities (health), the next steps with their timestamps (traffic, utility). Every call but /health and the docs needs an API key in the header 'X-API-Key: KEY'. With --personalised FILE the node's personalised model of the package's run is served instead of the global one (GET /model says which). Example: fl-serve runs/h3-package --site Cleveland --api-key-file serve.keys --port 8480
    """
    import ssl

    import uvicorn

    from citydata.base import DataFileError
    from serving.features import RequestError, SiteError
    from serving.package import PackageError
    from serving.personalised import PersonalisedPathError

    manifest_sha256 = check_manifest_sha256(manifest_sha256)
    date_format = check_date_format_option(date_format)
    if test_start is not None:
        from citydata.forecasting import TEST_START_FORMAT, parse_test_start

        if data is None:
            raise typer.BadParameter("the bundled sites have their own public test starts; fix: leave --test-start out, "
                                     "or give it with your own --data file", param_hint="--test-start")
        try:
            test_start = parse_test_start(test_start).isoformat()
        except ValueError as exc:
            raise typer.BadParameter(f"{exc}; fix: write it as {TEST_START_FORMAT}", param_hint="--test-start") from None
    check_package_path(package)
    keys = read_keys(api_key_file)
    if tls_cert is not None and tls_key is None:
        raise typer.BadParameter(f"{tls_cert} is given without --tls-key; fix: {_KEY_FIX} with --tls-key, or leave "
                                 "both out to serve plain HTTP", param_hint="--tls-cert")
    if tls_key is not None and tls_cert is None:
        raise typer.BadParameter(f"{tls_key} is given without --tls-cert; fix: {_CERT_FIX} with --tls-cert, or leave "
                                 "both out to serve plain HTTP", param_hint="--tls-key")
    if client_ca is not None and tls_cert is None:
        raise typer.BadParameter("--client-ca (mutual TLS) needs --tls-cert and --tls-key", param_hint="--client-ca")
    check_plain_http(host, tls=tls_cert is not None)
    try:
        fastapi_app = build(package, site, data, keys, manifest_sha256=manifest_sha256, date_format=date_format,
                            ranges=ranges, personalised=personalised, test_start=test_start)
    except (DataFileError, SiteError, PersonalisedPathError) as exc:  # the node's own inputs (--site, --data,
        # --ranges, CITYFED_*, a --personalised path that is no personalised model file): exit 2, as fl-client
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (PackageError, RequestError, ValueError) as exc:  # ValueError: package and node disagree (schema, department)
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    tls = {}
    if tls_cert is not None:
        check_tls(tls_cert, tls_key, client_ca)
        tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
        if client_ca is not None:
            tls.update(ssl_ca_certs=str(client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    check_port(host, port)  # before announcing: a busy port is said plainly (exit 2), not by uvicorn's Errno
    scheme = "https" if tls else "http"
    err.print(f"serving {package} ({fastapi_app.title}) on {scheme}://{host}:{port} (docs: /docs)", highlight=False)
    uvicorn.run(fastapi_app, host=host, port=port, log_level="info", **tls)


def main() -> None:  # console script entry point
    """``fl-serve`` console script."""
    from privacy.safe_cli import run_app

    run_app(app, "fl-serve")
