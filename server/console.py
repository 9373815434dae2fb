"""Operator console: the coordinator's web page (``fl-server console``).

A FastAPI app, served by uvicorn, for the operators of the coordinator. It shows:

* **nodes**: Flower's node records (online/offline, since when) with the name and fingerprint
  ``fl-server register`` recorded (:func:`server.cli.list_nodes`, as ``fl-server nodes``) and the
  epsilon each node last **reported** in a reply (its ledger's lifetime total at its own delta,
  from the run folders: the coordinator cannot check it; the node's ledger is the record);
* **runs**: Flower's run records with their folder and result (:func:`server.cli.list_runs`, as
  ``fl-server runs``); per run the live round progress, metric and epsilon plots per site
  (inline SVG), refusals, exclusions and missed deadlines, from ``results.json`` or, while the
  run goes on, from its checkpoint's history (what ``fl-server stop`` writes results from);
  the ServerApp log (``flwr log``, as ``fl-server logs``); links to ``report.html`` and to a
  model card (``model_card.json``/``.md``) where the run folder has one;
* **audit**: the coordinator's audit log (``<state-dir>/audit.jsonl``, or ``$CITYFED_AUDIT_LOG``)
  verified against ``audit.pub`` (as ``fl-server audit verify``) and its latest entries;
* a **stop** button per live run (:func:`server.cli.stop_run`, then :func:`server.cli._stopped_results`
  as ``fl-server stop``; the audit entry says ``via: console``).

Security (the console can stop runs and shows the audit log):

* it listens on 127.0.0.1 by default; another address is refused unless ``allow_remote`` is
  set **and** HTTPS is configured (certificate and key) - the admin token must not cross a
  network in clear;
* every page needs the **admin token** (``<state-dir>/console.token``, 32 random bytes, mode
  0600, made on first use; delete it to rotate): ``/login?token=...`` (the URL printed at start)
  or the login form sets an HttpOnly, SameSite=Strict session cookie, dated and signed with the
  token, that lasts :data:`SESSION_TTL_S` (12 h); ``POST /logout`` ends every session issued so
  far (while the console runs); scripts may send ``Authorization: Bearer <token>``;
* the stop form carries a CSRF token (an HMAC of the run folder under the admin token) and the
  request's ``Origin``, when sent, must be the console's own; the ``Host`` header must name the
  console (against DNS rebinding);
* a request body over :data:`MAX_FORM_BYTES` (8 KiB; the console's forms are far smaller) is
  refused with 413 before it is read: a ``Content-Length`` over the limit is refused unread, a
  chunked body is read only up to the limit (:func:`read_form_body`), so no client - the login
  form needs no token - can make the console hold a large body in memory;
* the pages run no script at all (Content-Security-Policy ``script-src 'none'``): live pages
  reload with ``<meta http-equiv="refresh">``; plots are inline SVG; nothing is fetched from
  outside; every value is escaped.

Nothing here reads records: the coordinator has none. The console holds no state of its own
besides the token; it reads the same sources as the CLI on each request (the coordinator's
answers cached for ``cache_s`` seconds).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response

from server import cli
from server.console_pages import CSS, Pages, Sources, _error
from server.report import esc

log = logging.getLogger(__name__)

#: File (in the state dir) holding the admin token.
TOKEN_FILE = "console.token"
#: Session cookie name.
COOKIE = "cityfed_console"
#: Largest request body (bytes) the console reads: its forms (login token, stop button) are well under 1 KiB.
MAX_FORM_BYTES = 8192
#: Files of a run folder the console serves (report, its plots, results, a model card).
SERVED_FILES = re.compile(r"(report\.html|results\.json|model[_-]card\.(json|md)|[A-Za-z0-9_-]{1,64}\.png)")


class ConsoleError(Exception):
    """A console set-up error for the operator (message names the option and the fix)."""


class BodyRefused(Exception):
    """A request body the console does not read (over :data:`MAX_FORM_BYTES`, or a bad ``Content-Length``)."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


async def read_form_body(request: Request, limit: int = MAX_FORM_BYTES) -> bytes:
    """The request body, read only up to ``limit`` bytes.

    A ``Content-Length`` over ``limit`` is refused before any of the body is read; a body sent
    without one (chunked) is read chunk by chunk and refused as soon as it passes ``limit``, so
    memory stays bounded whatever the client sends.

    Parameters
    ----------
    request : starlette.requests.Request
        The request.
    limit : int
        Most bytes read.

    Returns
    -------
    bytes

    Raises
    ------
    BodyRefused
        413 for a body over ``limit``, 400 for a ``Content-Length`` that is not a whole number.
    """
    too_large = (f"request body over {limit} bytes: refused unread (the console's forms are far smaller); "
                 "fix: send only the console's own form fields (token, csrf, confirm)")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise BodyRefused(400, "Content-Length is not a whole number; fix: send a valid HTTP request")
        if int(length) > limit:
            raise BodyRefused(413, too_large)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyRefused(413, too_large)
    return bytes(body)


# --------------------------------------------------------------------------- bind and token


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_to_others(path: Path) -> int:
    """The permission bits of ``path`` that let its group or other users read or change it (0: none).

    The console's admin token file must have none (``chmod 600``): the console makes it and is
    its only reader. (``fl-serve``'s API key file, which secret managers provision, has its own
    rule: :func:`serving.cli.key_file_problem`.)
    """
    return Path(path).stat().st_mode & 0o077


def check_bind(host: str, *, allow_remote: bool, certfile: Path | None, keyfile: Path | None) -> None:
    """Refuse an address the console must not listen on.

    Loopback is always allowed. Any other address (a LAN address, ``0.0.0.0``, a host name)
    needs ``allow_remote`` and HTTPS (``certfile`` and ``keyfile``, both readable files).

    Raises
    ------
    ConsoleError
        Naming the option and the fix.
    """
    if not host.strip():
        raise ConsoleError("--host is empty; fix: leave --host out (127.0.0.1), or pass an address of this machine")
    if (certfile is None) != (keyfile is None):
        raise ConsoleError("--certfile and --keyfile go together; fix: pass both (PEM certificate and its key) or neither")
    for opt, f in (("--certfile", certfile), ("--keyfile", keyfile)):
        if f is not None and not Path(f).is_file():
            raise ConsoleError(f"{opt} {f}: no such file; fix: pass the PEM file (e.g. from `fl-pki`)")
    if is_loopback(host):
        return
    if not allow_remote:
        raise ConsoleError(f"--host {host}: not a loopback address; the console can stop runs and shows the audit log, "
                           "so it listens on this machine only by default. Fix: use --host 127.0.0.1 (and an SSH "
                           "tunnel), or, on the admin network only, add --allow-remote with --certfile and --keyfile")
    if certfile is None:
        raise ConsoleError(f"--host {host} --allow-remote without HTTPS: the admin token would cross the network in "
                           "clear. Fix: add --certfile and --keyfile (a certificate for this host from the city CA, "
                           "`fl-pki`)")


def bind_error(host: str, port: int) -> OSError | None:
    """The error binding ``host:port`` gives now (a bind test, as the server binds), or None when it binds.

    ``fl-server console`` and ``fl-server start`` check it (:func:`server.start_checks.check_port_free`)
    before they write or start anything. A host name that does not resolve gives a
    :class:`socket.gaierror` (an ``OSError``).
    """
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc
    return None


def listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (:func:`bind_error`'s reason), or None when it can."""
    exc = bind_error(host, port)
    return None if exc is None else (exc.strerror or str(exc))


def check_tls_pair(certfile: Path, keyfile: Path) -> None:
    """Refuse ``--certfile``/``--keyfile`` that are not a PEM certificate and its (unencrypted) private key.

    Loads them as the server will (before anything is written), so that a wrong file is an
    input error, not a failure after the console has announced its address.

    Raises
    ------
    ConsoleError
        Naming both options and the fix.
    """
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # a password callback: an encrypted key is refused, never prompted for
        ctx.load_cert_chain(certfile, keyfile, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise ConsoleError(f"--certfile {certfile} --keyfile {keyfile}: not a PEM certificate and its unencrypted "
                           f"private key ({reason}); fix: pass the certificate and key `fl-pki server-cert` wrote "
                           "(server.crt and server.key) for this host") from None


def load_token(state_dir: Path) -> str:
    """The admin token in ``<state_dir>/console.token``; made (32 random bytes, mode 0600) when missing.

    Raises
    ------
    ConsoleError
        When the file cannot be made or read, is not a file, is readable by others, or holds no
        token (code 2 as ``fl-server console`` reports it).
    """
    path = Path(state_dir) / TOKEN_FILE
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ConsoleError(f"--state-dir {state_dir}: cannot write the admin token file {path} "
                               f"({exc.strerror or exc}); fix: run fl-server console as the user that owns the state "
                               "dir (the one that runs `fl-server start`), or pass a --state-dir this user can write") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    if not path.is_file():
        raise ConsoleError(f"{path}: is a folder (or another non-file), not the admin token file; fix: move it out of "
                           "the way; the console then makes a new token file there")
    if open_to_others(path):
        raise ConsoleError(f"{path}: readable by other users (mode {path.stat().st_mode & 0o777:o}); fix: "
                           f"chmod 600 {shlex.quote(str(path))}, or delete it to make a new token")
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConsoleError(f"{path}: cannot read it ({exc.strerror or exc}); fix: run fl-server console as the "
                           "file's owner (the state dir's), or delete it to make a new token") from None
    except UnicodeDecodeError:
        raise ConsoleError(f"{path}: not a token (not UTF-8 text); fix: delete it (a new one is made)") from None
    if len(token) < 16:
        raise ConsoleError(f"{path}: token shorter than 16 characters; fix: delete the file (a new one is made)")
    return token


#: Seconds a console session (the login cookie) lasts; then the admin token is asked for again.
SESSION_TTL_S = 12 * 3600
#: Seconds a session's issue time may lie ahead of this machine's clock.
CLOCK_SKEW_S = 60


def _now() -> float:
    """The clock sessions are dated by (a seam for tests)."""
    return time.time()


@dataclass
class Guard:
    """Session cookie and CSRF tokens derived from the admin token (HMAC-SHA256).

    A session cookie is ``<issued>.<HMAC of "session:<issued>">``: it lasts :data:`SESSION_TTL_S`
    from its issue time, cannot be re-dated without the token, and every session issued before the
    last log-out (``not_before``, kept while the console runs) is refused.
    """

    token: str
    not_before: float = 0.0

    def _mac(self, what: str) -> str:
        return hmac.new(self.token.encode(), what.encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        """A fresh session cookie value, dated now."""
        issued = max(int(_now()), int(self.not_before) + 1)
        return f"{issued}.{self._mac(f'session:{issued}')}"

    def end_sessions(self) -> None:
        """Refuse every session issued so far (log-out)."""
        self.not_before = max(self.not_before, float(int(_now())))

    def csrf(self, folder: str) -> str:
        """The CSRF token of the stop form of ``folder``."""
        return self._mac(f"stop:{folder}")

    def token_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def session_ok(self, given: str | None) -> bool:
        issued, _, mac = (given or "").partition(".")
        if not (issued.isdigit() and len(issued) <= 12 and mac):
            return False
        if not hmac.compare_digest(mac.encode(), self._mac(f"session:{issued}").encode()):
            return False
        age = _now() - int(issued)
        return int(issued) > self.not_before and -CLOCK_SKEW_S <= age <= SESSION_TTL_S

    def csrf_ok(self, folder: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf(folder).encode())


# --------------------------------------------------------------------------- app


def _netloc(url: str) -> str | None:
    """The host[:port] of ``url``, lowercased; None where it cannot be parsed (``http://[``)."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return None


def make_app(state_dir: Path, runs_dir: Path, *, token: str, refresh: int = 10, allowed_hosts: list[str] | None = None,
             cache_s: float = 3.0, stop_wait: float = 60.0):
    """The console's FastAPI app.

    Parameters
    ----------
    state_dir, runs_dir : Path
        The coordinator's state folder and runs folder (as for every ``fl-server`` command).
    token : str
        The admin token (:func:`load_token`).
    refresh : int
        Seconds between reloads of a page that shows a live run (0 = never).
    allowed_hosts : list of str, optional
        Host names the ``Host`` header may carry (default: loopback names); ``"*"`` allows any.
    cache_s : float
        Seconds the coordinator's answers are reused.
    stop_wait : float
        Seconds a stop waits for the ServerApp to exit before results.json is written (as
        ``fl-server stop --wait``).

    Returns
    -------
    fastapi.FastAPI
        ``app.state.stops`` lists the threads finishing stopped runs (joined by tests).
    """
    src = Sources(Path(state_dir), Path(runs_dir), cache_s=cache_s)
    guard = Guard(token)
    pages = Pages(src, guard, refresh)
    hosts = {h.lower() for h in (allowed_hosts or ["127.0.0.1", "localhost", "::1", "[::1]"])}
    app = FastAPI(title="cityfed operator console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stops = []
    app.state.sources = src

    headers = {"Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
                                          "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
               "X-Frame-Options": "DENY"}

    def login_form(msg: str = "", code: int = 401) -> HTMLResponse:
        return HTMLResponse(pages.page("log in", "<h1>Log in</h1>" + _error(msg) +
                                       '<form method="post" action="/login"><label>Admin token '
                                       '<input type="password" name="token" autocomplete="off" required></label> '
                                       '<button type="submit">Log in</button></form><p class="note">The token is in '
                                       f'{esc(Path(state_dir) / TOKEN_FILE)} on the coordinator; fl-server console prints '
                                       "a login URL when it starts.</p>"), status_code=code)

    def host_ok(request: Request) -> bool:
        host = (request.headers.get("host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return "*" in hosts or name in hosts or host in hosts

    @app.middleware("http")
    async def protect(request: Request, call_next):
        if not host_ok(request):
            resp = PlainTextResponse("unknown Host header; open the console by the address it listens on", 421)
        elif request.url.path in ("/login", "/console.css"):
            resp = await call_next(request)
        else:
            auth = request.headers.get("authorization", "")
            bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            if guard.session_ok(request.cookies.get(COOKIE)) or guard.token_ok(bearer):
                resp = await call_next(request)
            else:
                resp = login_form("Log in with the admin token to see this page.")
        for k, v in headers.items():
            resp.headers.setdefault(k, v)
        return resp

    def logged_in(request: Request, nxt: str | None = None) -> RedirectResponse:
        target = nxt if nxt and nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/"
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(COOKIE, guard.new_session(), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/", max_age=SESSION_TTL_S)
        return resp

    @app.get("/login", response_class=HTMLResponse)
    def login_get(request: Request, token: str | None = None, next: str | None = None):  # noqa: A002
        if token is None:
            return login_form("", 200)
        return logged_in(request, next) if guard.token_ok(token) else login_form("Wrong token.", 403)

    @app.exception_handler(BodyRefused)
    async def body_refused(request: Request, exc: BodyRefused):
        # the rest of an unread body is not waited for: the connection is closed after the answer
        return PlainTextResponse(exc.text, exc.status, headers={"Connection": "close"})

    async def form(request: Request) -> dict[str, str]:
        # url-encoded forms only (the console's own); parsed here: no python-multipart dependency.
        # At most MAX_FORM_BYTES are read (BodyRefused: 413 before reading more)
        body = (await read_form_body(request)).decode("utf-8", errors="replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    @app.post("/login", response_class=HTMLResponse)
    async def login_post(request: Request):
        token = (await form(request)).get("token", "")
        return logged_in(request) if guard.token_ok(token) else login_form("Wrong token.", 403)

    @app.post("/logout")
    def logout(request: Request):
        guard.end_sessions()  # a copy of the cookie kept elsewhere stops working too
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return resp

    @app.get("/console.css")
    def css():
        return Response(CSS, media_type="text/css")

    @app.get("/", response_class=HTMLResponse)
    def overview():
        return pages.overview()

    @app.get("/nodes", response_class=HTMLResponse)
    def nodes():
        return pages.nodes_page()

    @app.get("/runs", response_class=HTMLResponse)
    def runs():
        return pages.runs_page()

    @app.get("/audit", response_class=HTMLResponse)
    def audit():
        return pages.audit_page()

    def not_found(what: str) -> HTMLResponse:
        return HTMLResponse(pages.page("not found", f"<h1>Not found</h1><p>{esc(what)}</p>"), status_code=404)

    @app.get("/runs/{folder}", response_class=HTMLResponse)
    def run(folder: str, msg: str | None = None):
        html_ = pages.run_page(folder, flash=msg)
        return html_ if html_ is not None else not_found(f"no run folder {folder!r} under {src.runs_dir}")

    @app.get("/runs/{folder}/log", response_class=HTMLResponse)
    def run_log(folder: str):
        html_ = pages.log_page(folder)
        return html_ if html_ is not None else not_found(f"no run folder {folder!r} under {src.runs_dir}")

    @app.get("/runs/{folder}/model-card", response_class=HTMLResponse)
    def run_card(folder: str):
        html_ = pages.card_page(folder)
        return html_ if html_ is not None else not_found(f"no run folder {folder!r} under {src.runs_dir}")

    @app.get("/runs/{folder}/{name}")
    def run_file(folder: str, name: str):
        known = {d["folder"] for d in src.launches()}
        if folder not in known or not SERVED_FILES.fullmatch(name):
            return not_found(f"{folder}/{name} is not a file the console serves")
        path = (src.runs_dir / folder / name).resolve()
        if path.parent != (src.runs_dir / folder).resolve() or not path.is_file():
            return not_found(f"{folder}/{name} does not exist")
        media = {".html": "text/html", ".json": "application/json", ".md": "text/plain", ".png": "image/png"}[path.suffix]
        return FileResponse(path, media_type=media)

    @app.post("/runs/{folder}/stop")
    async def stop(request: Request, folder: str):
        fields = await form(request)
        csrf, confirm = fields.get("csrf", ""), fields.get("confirm", "")
        origin = request.headers.get("origin")
        if origin and origin != "null" and _netloc(origin) != (request.headers.get("host") or "").lower():
            return PlainTextResponse(f"refused: request from another site ({origin[:100]!r})", 403)
        if origin == "null" or not guard.csrf_ok(folder, csrf):
            return PlainTextResponse("refused: missing or wrong CSRF token; use the stop button of the run's page", 403)
        if confirm != "yes":
            return RedirectResponse(f"/runs/{folder}?msg=not+stopped%3A+tick+the+confirmation+box", status_code=303)
        if folder not in {d["folder"] for d in src.launches()}:
            return not_found(f"no run folder {folder!r} under {src.runs_dir}")
        try:
            rid = cli.stop_run(src.state_dir, src.runs_dir, folder, via="console",
                               client=request.client.host if request.client else None)
        except cli.CliError as exc:  # 409: the run had already finished (exc.code 2); 502: the coordinator failed
            return HTMLResponse(pages.page("stop failed", f"<h1>Run {esc(folder)} not stopped</h1>{_error(str(exc))}"
                                           f'<p><a href="/runs/{esc(folder)}">back to the run</a></p>'),
                                status_code=409 if exc.code == 2 else 502)
        log.warning("console: run %s (%s) stopped by an operator from %s", rid, folder,
                    request.client.host if request.client else "?")
        th = threading.Thread(target=cli._stopped_results, args=(src.state_dir, src.runs_dir, rid, stop_wait),
                              name=f"console-stop-{rid}", daemon=True)
        th.start()
        app.state.stops.append(th)
        src.forget()
        msg = (f"stopped run {rid}; its results.json and report are written once its ServerApp has exited "
               f"(up to {stop_wait:g} s)")
        return RedirectResponse(f"/runs/{folder}?msg={msg.replace(' ', '+').replace(';', '%3B')}", status_code=303)

    return app


def serve(state_dir: Path, runs_dir: Path, *, host: str = "127.0.0.1", port: int = 8090, allow_remote: bool = False,
          certfile: Path | None = None, keyfile: Path | None = None, refresh: int = 10) -> None:
    """Run the console until interrupted (``fl-server console``).

    Raises
    ------
    server.errors.CliError
        Code 2, naming the option and the fix, before anything is written: a missing
        ``--state-dir``, a refused bind (:func:`check_bind`), TLS files that are not a
        certificate and its key, a certificate expired or not yet valid (as ``fl-server start``:
        :func:`server.start_checks.check_cert_in_date`), a ``--host`` that is not an address or
        host name (:func:`server.start_checks.check_host`), a ``--host``/``--port`` it cannot listen on (in use, or not an
        address of this machine: :func:`server.start_checks.check_port_free`, as ``fl-server start``),
        a token file problem (:func:`load_token`).
    """
    import socket
    import sys

    import uvicorn

    if not Path(state_dir).is_dir():
        raise cli.CliError(f"--state-dir {state_dir}: no such folder; fix: pass the coordinator's state dir (the one "
                           "`fl-server start` uses; default $CITYFED_STATE_DIR or ~/.cityfed/coordinator)")
    from server.start_checks import check_cert_in_date, check_host

    check_host(host)  # as `fl-server start`: an address or host name, no port, no scheme
    try:
        check_bind(host, allow_remote=allow_remote, certfile=certfile, keyfile=keyfile)
        if certfile is not None and keyfile is not None:
            check_tls_pair(certfile, keyfile)
            check_cert_in_date(certfile, "--certfile", "the console")  # as `fl-server start` checks its --cert
        cli.check_port_free(host, port)  # as `fl-server start`: code 2, before the token file is made
        token = load_token(state_dir)
    except ConsoleError as exc:
        raise cli.CliError(str(exc)) from None
    hosts = ["127.0.0.1", "localhost", "::1", "[::1]"] if is_loopback(host) else ["*"]
    app = make_app(state_dir, runs_dir, token=token, refresh=refresh, allowed_hosts=hosts)
    scheme = "https" if certfile else "http"
    shown = host if host not in ("0.0.0.0", "::") else socket.getfqdn()
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    url = f"{scheme}://{shown}:{port}/login"
    if sys.stdout.isatty():
        print(f"cityfed operator console: open {url}?token={token}", flush=True)
    else:
        print(f"cityfed operator console: open {url} and log in with the token in {Path(state_dir) / TOKEN_FILE}",
              flush=True)
    uvicorn.run(app, host=host.strip("[]"), port=port, ssl_certfile=str(certfile) if certfile else None,
                ssl_keyfile=str(keyfile) if keyfile else None, access_log=False, log_level="warning")
