"""``fl-pki``: the city's key and certificate tool (typer + rich front end of :mod:`privacy.pki`).

Exit codes: 0 success, 1 ``verify`` found the certificate untrustworthy, 2 bad input
(missing or unreadable file, invalid option value, refusing to overwrite).
"""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from privacy.safe_cli import make_console
from rich.markup import escape
from rich.table import Table

from privacy import pki

app = typer.Typer(
    suggest_commands=False,  # click says "Did you mean ...?" itself (typer repeated it)
    name="fl-pki",
    epilog="Errors print a message naming the file, field and fix, never a traceback (it could show records); add --debug anywhere on the command line for the full traceback.",
    help=(
        "Keys and certificates for the city's federated-learning network.\n\n"
        "Typical flow: the coordinator team runs [bold]init[/] once (city CA) and "
        "[bold]server-cert[/] for the SuperLink; each department runs [bold]node-key[/] on its "
        "own machine and hands node.pub to the coordinator, who registers it with "
        "`fl-server register node.pub`. [bold]show[/] and [bold]verify[/] inspect the results.\n\n"
        "Exit codes: 0 ok, 1 verification failed, 2 bad input."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,  # never print key material from a traceback
)


def _command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command whose help is its docstring with the source line breaks unwrapped."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
        return app.command(name, help="\n\n".join(" ".join(p.split("\n")) for p in paragraphs))(fn)

    return register


def _out() -> Console:
    return make_console()


def _err() -> Console:
    return make_console(stderr=True)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn library errors into a red message and the documented exit code."""
    try:
        yield
    except pki.CertificateInvalid as err:
        _err().print(f"[bold red]FAILED:[/] {escape(str(err))}")
        raise typer.Exit(1) from None
    except pki.PKIError as err:
        _err().print(f"[bold red]error:[/] {escape(str(err))}")
        raise typer.Exit(2) from None


Force = Annotated[
    bool,
    typer.Option("--force", help="Replace existing files. Anything signed or registered with the old key stops working."),
]
Curve = Annotated[
    str,
    typer.Option("--curve", help="Elliptic curve of the new key: p384 (default) or p256.", case_sensitive=False),
]


@_command("init")
def init_cmd(
    out: Annotated[Path, typer.Option("--out", help="Directory for ca.key and ca.crt (created 0700 if missing). Keep it offline/backed up.")],
    name: Annotated[str, typer.Option("--name", help="CA common name shown in every certificate it signs.")] = "City FL CA",
    days: Annotated[int, typer.Option("--days", min=1, help="CA validity in days (at most 36500).")] = 3650,
    curve: Curve = "p384",
    force: Force = False,
) -> None:
    """Create the city CA: [bold]ca.key[/] (mode 0600, the secret) and self-signed [bold]ca.crt[/] (0644).

    ca.crt is public: every department gets a copy and passes it to
    `flower-supernode --root-certificates ca.crt`. ca.key signs the coordinator's
    certificate and stays with the CA operator only (offline or in a vault): it never goes to
    the coordinator or a department. Existing files are never
    overwritten unless --force is given.
    """
    with _errors():
        key_path, cert_path = pki.create_ca(out, name, days=days, curve=curve, force=force)
        info = pki.describe_certificates(cert_path)[0]
    c = _out()
    c.print(f"[green]Created city CA[/] {escape(info.subject)} ({info.key_type}), valid until {info.not_after:%Y-%m-%d}")
    c.print(f"  private key : {escape(str(key_path))}  (0600, keep secret)")
    c.print(f"  certificate : {escape(str(cert_path))}  (0644, give to every department)")
    c.print(f"  SHA-256     : {info.sha256}")
    c.print(f"Next: fl-pki server-cert --ca-dir {escape(shlex.quote(str(out)))} --out <dir> --san <coordinator host or IP> ...")


@_command("server-cert")
def server_cert_cmd(
    ca_dir: Annotated[Path, typer.Option("--ca-dir", help="Directory with ca.key and ca.crt from `fl-pki init`.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for server.key and server.crt (created 0700 if missing).")],
    san: Annotated[
        list[str],
        typer.Option(
            "--san",
            help=(
                "A name clients dial: an IP address (becomes an IP SAN) or a DNS host name. "
                "Repeat for each one, e.g. --san 127.0.0.1 --san localhost --san coord.city.example. "
                "Clients can only connect using a name listed here."
            ),
        ),
    ],
    days: Annotated[int, typer.Option("--days", min=1, help="Certificate validity in days (must end before the CA expires).")] = 825,
    curve: Curve = "p384",
    force: Force = False,
) -> None:
    """Issue the coordinator's TLS key [bold]server.key[/] (0600) and [bold]server.crt[/] (0644), signed by the city CA.

    Use them for the SuperLink: `flower-superlink --ssl-ca-certfile ca.crt
    --ssl-certfile server.crt --ssl-keyfile server.key` (they also work for Python ssl,
    gRPC and uvicorn). Departments connect with `--root-certificates ca.crt` and must
    dial one of the --san names.
    """
    with _errors():
        key_path, cert_path = pki.issue_server_cert(ca_dir, out, san, days=days, curve=curve, force=force)
        info = pki.describe_certificates(cert_path)[0]
    c = _out()
    c.print(f"[green]Issued server certificate[/] {escape(info.subject)}, valid until {info.not_after:%Y-%m-%d}")
    c.print(f"  SANs        : {escape(', '.join(info.sans))}")
    c.print(f"  private key : {escape(str(key_path))}  (0600)")
    c.print(f"  certificate : {escape(str(cert_path))}  (0644)")
    if not any(s.strip() in ("IP:127.0.0.1", "127.0.0.1") for s in info.sans):
        _err().print("[yellow]note:[/] no 127.0.0.1 SAN: `fl-server start` refuses this certificate, because the "
                     "fl-server commands on the coordinator dial 127.0.0.1. Fix: issue it again with --force and "
                     "--san 127.0.0.1 next to the other names")
    c.print(f"Check it with: fl-pki verify --ca {escape(shlex.quote(str(Path(ca_dir) / pki.CA_CERT)))} "
            f"--cert {escape(shlex.quote(str(cert_path)))}")


@_command("node-key")
def node_key_cmd(
    department: Annotated[str, typer.Option("--department", help="This node's department: health, traffic or utility.")],
    site: Annotated[str, typer.Option("--site", help="Site name as fl-client --site takes it (the data file's name), e.g. Cleveland or 'VA Long Beach'; no ':'.")],
    out: Annotated[Path, typer.Option("--out", help="Directory on THIS machine for node.key and node.pub (created 0700 if missing).")],
    force: Force = False,
) -> None:
    """Create this department node's Flower authentication key. Run it ON THE DEPARTMENT'S OWN MACHINE.

    Writes [bold]node.key[/] (0600, EC P-384, OpenSSH format; it never leaves this machine:
    `flower-supernode --auth-supernode-private-key node.key`) and [bold]node.pub[/] (0644),
    which you send to the coordinator, who runs `fl-server register node.pub`.
    Read the printed SHA256 fingerprint to the coordinator by phone so they can confirm
    the node.pub they received is yours. No other file in --out is touched.
    """
    with _errors():
        kept = _keep_replaced_pub(Path(out).expanduser()) if force else None
        try:
            key_path, pub_path, fingerprint = pki.create_node_key(out, department, site, force=force)
        except BaseException:
            if kept is not None:
                kept.unlink(missing_ok=True)  # the old node.pub is still in place
            raise
    c = _out()
    c.print(f"[green]Created node key[/] for cityfed:{escape(department)}:{escape(site)} (EC P-384)")
    c.print(f"  private key : {escape(str(key_path))}  (0600, never leaves this machine)")
    c.print(f"  public key  : {escape(str(pub_path))}  (0644, send to the coordinator)")
    c.print(f"  fingerprint : [bold]{fingerprint}[/]")
    if kept is not None:
        c.print(f"  replaced    : the previous node.pub is kept as {escape(str(kept))}: it verifies this node's audit "
                "entries signed before the change (`fl-client audit verify --pub node.pub --pub "
                f"{escape(kept.name)}`)")
    c.print("Read the fingerprint to the coordinator; they compare it with `fl-pki show node.pub`.")


def _keep_replaced_pub(out: Path) -> Path | None:
    """Copy ``out/node.pub`` (about to be replaced by ``--force``) to ``node-replaced-<UTC time>.pub`` (0644).

    The old public key is what verifies the node's audit entries signed before the key change;
    the old private key is not kept. Returns the copy, or None when there is no node.pub.
    """
    from datetime import datetime, timezone

    pub = out / pki.NODE_PUB
    if not pub.is_file():
        return None
    kept = out / f"node-replaced-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}.pub"
    pki._write_files([(kept, pub.read_bytes(), pki.PUBLIC_MODE)], force=False)
    return kept


def _cert_table(info: pki.CertInfo, title: str) -> Table:
    colour = {"expired": "red", "not yet valid": "red", "expiring": "yellow"}.get(info.status, "green")
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("Subject", escape(info.subject))
    table.add_row("Issuer", escape(info.issuer))
    table.add_row("CA", "yes" if info.is_ca else "no")
    table.add_row("Key", info.key_type)
    table.add_row("SANs", escape(", ".join(info.sans)) or "-")
    table.add_row("Not before", f"{info.not_before:%Y-%m-%d %H:%M} UTC")
    table.add_row("Not after", f"{info.not_after:%Y-%m-%d %H:%M} UTC")
    label = {"expired": "EXPIRED", "not yet valid": "NOT YET VALID", "expiring": "expires soon"}.get(info.status, "ok")
    table.add_row("Days left", f"[{colour}]{info.days_left} ({label})[/]")
    table.add_row("SHA-256", info.sha256)
    return table


@_command("show")
def show_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Certificates (.crt/.pem, PEM bundles, DER) and OpenSSH public keys (.pub).")],
) -> None:
    """Show certificates (subject, issuer, SANs, validity, days left) and public keys (type, fingerprint).

    PATHS are certificates (.crt/.pem, PEM bundles, DER) and OpenSSH public keys (.pub).
    Days left turn [yellow]yellow[/] under 30 days and [red]red[/] once expired. Private
    keys (.key) are refused: they are never displayed. Use `fl-pki verify` to check a
    certificate against the CA.

    Every file that can be read is shown, in the order given; one that cannot (missing, a
    folder, damaged, a private key) gets its error where it comes, and the command ends with
    a line naming every file not shown (given several files); exit status 2.
    """
    # A read-only look: the files that can be shown still are (a glob of certificates with one
    # bad file in it shows the others), and the last line says which were not: output that
    # looks complete is not taken for a complete success.
    c = _out()
    failed: list[Path] = []
    for path in paths:
        try:
            _show_one(c, path)
        except pki.PKIError as err:
            _err().print(f"[bold red]error:[/] {escape(str(err))}")
            failed.append(path)
    if failed and len(paths) > 1:
        names = escape(", ".join(str(p) for p in failed))
        _err().print(f"[bold red]fl-pki show:[/] {len(failed)} of {len(paths)} files not shown: {names}; fix: see each "
                     "file's error above, or leave those files out")
    if failed:
        raise typer.Exit(2)


def _show_one(c: Console, path: Path) -> None:
    try:
        head = path.read_bytes()[:4096] if path.is_file() else b""
    except OSError as err:
        raise pki.PKIError(f"{path}: cannot read ({err.strerror}); fix: check its permissions") from None
    if b"PRIVATE KEY" in head:
        raise pki.PKIError(f"{path}: is a private key; fix: show only reads certificates and .pub files (never share a .key)")
    if head.lstrip().startswith((b"ssh-", b"ecdsa-", b"sk-")) or (path.suffix == ".pub" and b"CERTIFICATE" not in head):
        key = pki.load_public_key(path)
        table = Table(title=escape(str(path)), show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        table.add_row("Type", f"{key.key_type} ({key.curve})")
        table.add_row("Fingerprint", key.fingerprint)
        table.add_row("Comment", escape(key.comment) or "-")
        c.print(table)
        return
    infos = pki.describe_certificates(path)
    for i, info in enumerate(infos):
        title = str(path) if len(infos) == 1 else f"{path} ({i + 1} of {len(infos)})"
        c.print(_cert_table(info, title))


@_command("verify")
def verify_cmd(
    ca: Annotated[Path, typer.Option("--ca", help="The city CA certificate (ca.crt).")],
    cert: Annotated[Path, typer.Option("--cert", help="The certificate to check (server.crt).")],
    host: Annotated[
        Optional[str],
        typer.Option("--host", help="Name or IP clients dial; default: check every SAN in the certificate."),
    ] = None,
) -> None:
    """Check that a certificate chains to the CA, is within its validity period and covers the host.

    Exit 0 if it verifies, 1 if it must not be trusted (other CA, expired, host not in
    SANs), 2 if a file cannot be read or an option is invalid.
    """
    with _errors():
        result = pki.verify_server_cert(ca, cert, host)
    colour = "yellow" if result.days_left < pki.EXPIRY_WARNING_DAYS else "green"
    _out().print(
        f"[green]OK:[/] {escape(str(cert))} chains to {escape(str(ca))} and is valid for "
        f"{escape(', '.join(result.names))}; expires {result.not_after:%Y-%m-%d} "
        f"([{colour}]{result.days_left} days left[/])"
    )


def main() -> None:
    """Entry point of the ``fl-pki`` console script."""
    from privacy.safe_cli import run_app

    run_app(app, "fl-pki")  # errors: a message, never a traceback with records in it (--debug shows it)


if __name__ == "__main__":
    main()
