"""The city's key and certificate library behind ``fl-pki``.

Three kinds of key material exist in a cityfed deployment:

* the **city CA** (``ca.key`` / ``ca.crt``), kept by the coordinator team; it signs the
  coordinator's TLS certificate and every department trusts ``ca.crt``;
* the **coordinator's TLS certificate** (``server.key`` / ``server.crt``) for the Flower
  SuperLink (``--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key``);
* one **node key** per department machine (``node.key`` / ``node.pub``), generated on that
  machine. ``node.key`` never leaves it (``flower-supernode --auth-supernode-private-key
  node.key``); ``node.pub`` is handed to the coordinator (``fl-server register
  node.pub``, which runs Flower's ``flwr supernode register``).

Private files are created with mode 0600 through ``os.open`` (never written first and then
chmod-ed), public files with mode 0644. Every failure is a :class:`PKIError` whose message
names the file or value at fault and says how to fix it.
"""

from __future__ import annotations

import base64
import difflib
import errno
import hashlib
import ipaddress
import json
import os
import re
import secrets
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from contract.text_files import BOM_FIX, UTF8_BOM
from privacy.audit import fsync_dir
from privacy.policy import shown_value
from privacy.safe_cli import pid_alive

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

#: Curves offered for the CA and the server key. Node keys are always P-384, the curve
#: Flower's own key generator uses (any NIST curve passes Flower's check).
CURVES: dict[str, ec.EllipticCurve] = {"p384": ec.SECP384R1(), "p256": ec.SECP256R1()}

#: Certificates are back-dated by this much so machines with a slightly slow clock accept
#: a certificate issued a minute ago.
CLOCK_SKEW = timedelta(hours=1)

#: Below this many days left, ``fl-pki show`` warns.
EXPIRY_WARNING_DAYS = 30

#: Longest validity ``--days`` may ask for (100 years); a certificate cannot end after 9999-12-31
#: either (X.509's GeneralizedTime has four year digits), and a server certificate not after its CA.
MAX_DAYS = 36500
_LAST_INSTANT = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)

#: The city's departments (``--department`` of ``fl-pki node-key``, ``fl-client`` and the policies).
DEPARTMENTS = ("health", "traffic", "utility")

#: Longest ``--site`` (the limit ``fl-client`` and the data files use).
MAX_SITE_NAME = 100

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class PKIError(ValueError):
    """A key or certificate problem, phrased for the operator: what is wrong, and the fix."""


class CertificateInvalid(PKIError):
    """A certificate that was read correctly but must not be trusted (``fl-pki verify`` exit 1)."""


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class CertInfo:
    """What ``fl-pki show`` prints about one certificate."""

    path: Path
    subject: str
    issuer: str
    sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    now: datetime
    is_ca: bool
    key_type: str
    sha256: str

    @property
    def days_left(self) -> int:
        """Whole days until ``not_after`` (negative once expired)."""
        return (self.not_after - self.now) // timedelta(days=1)

    @property
    def status(self) -> str:
        """One of ``"expired"``, ``"not yet valid"``, ``"expiring"`` or ``"ok"``."""
        if self.now > self.not_after:
            return "expired"
        if self.now < self.not_before:
            return "not yet valid"
        if self.not_after - self.now < timedelta(days=EXPIRY_WARNING_DAYS):
            return "expiring"
        return "ok"


@dataclass(frozen=True)
class PublicKeyInfo:
    """What ``fl-pki show`` prints about one OpenSSH public key."""

    path: Path
    key_type: str
    curve: str
    fingerprint: str
    comment: str


@dataclass(frozen=True)
class VerifyResult:
    """A certificate that verified: the names checked and its remaining lifetime."""

    names: tuple[str, ...]
    not_after: datetime
    days_left: int


# --------------------------------------------------------------------------- helpers


def _utcnow(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise PKIError(f"now={now!r} has no time zone; pass an aware datetime in UTC")
    return now.astimezone(timezone.utc)


def _check_days(days: int, what: str) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"--days {days!r} for the {what} is invalid; pass a whole number of days >= 1")


def _not_after(days: int, what: str, now: datetime, ca: x509.Certificate | None = None,
               ca_path: Path | None = None) -> datetime:
    """``now + days``, refusing (never overflowing on) a lifetime past every limit that applies.

    The limits: :data:`MAX_DAYS`, the last instant a certificate can hold (9999-12-31), and for a
    certificate signed by ``ca``, the CA's own expiry.
    """
    _check_days(days, what)
    day = timedelta(days=1)
    to_9999 = (_LAST_INSTANT - now) // day
    limits = [(MAX_DAYS, f"is more than {MAX_DAYS} days (100 years)", "")]
    limits.append((to_9999, "would end after the year 9999, the last date a certificate can hold", ""))
    if ca is not None:
        ca_left = (ca.not_valid_after_utc - now) // day
        limits.append((ca_left, f"would outlast the CA: {ca_path} expires on {ca.not_valid_after_utc:%Y-%m-%d} (in "
                                f"{max(ca_left, 0)} days)", ", or renew the CA"))
    limit, why, renew = min(limits, key=lambda item: item[0])
    if days <= limit:
        return now + timedelta(days=days)
    fix = f"pass --days {limit} or less{renew}" if limit >= 1 else "renew the CA (`fl-pki init --force`)" if renew \
        else "check this machine's clock"
    raise PKIError(f"--days {days} for the {what} {why}; fix: {fix}")


def _curve(curve: str) -> ec.EllipticCurve:
    try:
        return CURVES[curve.lower()]
    except KeyError:
        raise PKIError(f"--curve {curve!r} is not supported; use one of {', '.join(CURVES)}") from None


def _hash_for(key: ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


def _os_fix(err: OSError, out: Path) -> str:
    """The fix for an ``OSError`` met while creating ``out`` or writing into it."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"pass a --out directory this user can write to, or ask the owner of {out} for write access"
    if err.errno == errno.EROFS:
        return "pass a --out directory on a writable disk"
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "free some disk space (or pass a --out directory on another disk), then run again"
    if err.errno == errno.ENAMETOOLONG:
        return "pass a shorter --out path"
    return "check the --out path and its disk, then run again"


def _prepare_dir(out: Path) -> Path:
    """Create ``--out`` (mode 0700) if missing; a :class:`PKIError` naming --out and the fix if that fails."""
    out = Path(out).expanduser()
    try:
        if out.exists() and not out.is_dir():
            raise PKIError(f"--out {out}: exists and is not a directory; fix: pass a directory to --out")
        blocker = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise PKIError(f"--out {out}: cannot be created, as {blocker} is a file, not a directory; fix: pass a "
                           f"--out directory that is not inside the file {blocker}")
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise PKIError(f"--out {out}: cannot create this directory ({err.strerror or err}); fix: {_os_fix(err, out)}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PKIError(f"--out {out}: this user cannot write into it (permission denied); fix: "
                       f"{_os_fix(PermissionError(errno.EACCES, 'Permission denied'), out)}")
    return out


def _write_into(out: Path, files: Sequence[tuple[str, bytes, int]], force: bool) -> list[Path]:
    """Create ``--out`` if needed and write ``(name, data, mode)`` files into it as one set.

    If nothing could be written, a directory this call created is removed again (only while
    empty), so a failed run leaves no trace.

    Returns
    -------
    list of Path
        The written files, in order.
    """
    out = Path(out).expanduser()
    try:
        new = next((p for p in [*reversed(out.parents), out] if not p.exists()), None)
    except OSError:
        new = None
    try:
        out = _prepare_dir(out)
        paths = [(out / name, data, mode) for name, data, mode in files]
        _write_files(paths, force=force)
    except BaseException:
        d = out
        while new is not None:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                break
            if d == new or d == d.parent:
                break
            d = d.parent
        raise
    return [p for p, _, _ in paths]


def _write_files(files: Sequence[tuple[Path, bytes, int]], *, force: bool) -> None:
    """Write ``(path, data, mode)`` triples as one set: all of them, or none (the old set stays).

    Refuses up front if any exists and not ``force`` (or, with ``force``, if one is a directory).
    Each file is created by ``os.open`` with its final mode (private keys are never readable
    by others, not even for an instant). Without ``force`` the targets themselves are created
    with ``O_EXCL``, and removed again if a later one fails, so a retry is not blocked by a
    lone ``*.key``. With ``force`` every file is first written to a fresh temporary file (so
    the old file's, possibly looser, mode is not inherited), then each is renamed over its
    target; if a rename fails, the ones already replaced get their old file back, so a key
    never ends up next to another key's certificate.

    Raises
    ------
    PKIError
        Existing files without ``force``, a directory in the way, or an ``OSError`` (permission
        denied, disk full, ...), naming ``--out``, the file and the fix.
    """
    if not files:
        return
    out = files[0][0].parent
    finish_interrupted_replace(out)  # a --force killed part-way here: finished before anything is checked
    if not force:
        existing = [str(p) for p, _, _ in files if os.path.lexists(p)]
        if existing:
            raise PKIError(
                f"{', '.join(existing)}: already exist{'s' if len(existing) == 1 else ''}; refusing to overwrite key material. "
                "Fix: pass --force to replace it (anything signed or registered with the old "
                "key stops working), or choose another --out directory"
            )
    else:
        in_the_way = [str(p) for p, _, _ in files if p.is_dir() and not p.is_symlink()]
        if in_the_way:
            raise PKIError(f"{', '.join(in_the_way)}: is a directory, and --force replaces only files; nothing was "
                           "changed; fix: move that directory away, or choose another --out directory")
    created: list[Path] = []  # files this call made: the targets (no force) or the temporary files (force)
    complete = False
    current = files[0][0]
    try:
        staged: list[tuple[Path, Path]] = []
        for path, data, mode in files:
            current = path
            # the writer's pid in the name: a later fl-pki removes the temporaries of a process that was killed
            target = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp") if force else path
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            created.append(target)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), mode)  # the umask may have removed bits from a public file's 0644
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            staged.append((target, path))
        if force:
            _replace_all(staged)
        complete = True
    except FileExistsError:
        raise PKIError(
            f"{current}: appeared while writing; nothing was changed; fix: make sure no other fl-pki runs on the "
            "same directory, then run again"
        ) from None
    except OSError as err:
        raise PKIError(f"--out {out}: cannot write {current.name} ({err.strerror or err}); nothing was changed; "
                       f"fix: {_os_fix(err, out)}") from None
    finally:
        if not complete:
            for p in created:
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass


#: Journal of a ``--force`` replacement in progress, in the folder of the files it replaces.
REPLACE_JOURNAL = ".fl-pki-replace.json"


def _replace_all(staged: Sequence[tuple[Path, Path]]) -> None:
    """Rename each temporary file over its target, as one step that survives a crash.

    The complete temporaries are listed first in a journal (:data:`REPLACE_JOURNAL`, fsynced): a
    process killed between two renames leaves the journal, and the next fl-pki or fl-client that
    touches the folder finishes the renames (:func:`finish_interrupted_replace`), so a key never
    stays next to another key's public key or certificate. On a Python exception the replaced
    targets get their old file back (hard-link backups), then it re-raises.
    """
    folder = staged[0][1].parent
    plan = [(tmp, path, path.with_name(f".{path.name}.{secrets.token_hex(6)}.old")) for tmp, path in staged]
    journal = folder / REPLACE_JOURNAL
    _write_journal(journal, [{"tmp": t.name, "target": p.name, "backup": b.name} for t, p, b in plan], os.getpid())
    done: list[tuple[Path, Path | None]] = []  # (target, hard link to its old file, or None if there was none)
    try:
        for tmp, path, backup in plan:
            if os.path.lexists(path):
                try:
                    os.link(path, backup, follow_symlinks=False)
                except (OSError, NotImplementedError):
                    backup = None  # no hard links here: the replacement cannot be undone, go ahead anyway
            else:
                backup = None
            try:
                os.replace(tmp, path)
            except BaseException:
                if backup is not None:
                    backup.unlink(missing_ok=True)
                raise
            done.append((path, backup))
    except BaseException:
        for path, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, path)
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                pass
        raise
    finally:
        for _, backup in done:
            if backup is not None:
                try:
                    backup.unlink(missing_ok=True)
                except OSError:
                    pass
        try:
            journal.unlink(missing_ok=True)
            fsync_dir(folder)
        except OSError:
            pass


def _write_journal(journal: Path, entries: list[dict], pid: int) -> None:
    tmp = journal.with_name(f".{journal.name}.{pid}-{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"replace": entries, "pid": pid}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, journal)
        fsync_dir(journal.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finish_interrupted_replace(folder: Path) -> list[str]:
    """Finish a ``--force`` replacement that was killed part-way in ``folder`` (no-op without a journal).

    Every temporary listed in the journal was complete before the first rename, so the renames are
    carried forward; the old files' hard-link copies (old private keys) are removed, then the journal.

    Parameters
    ----------
    folder : Path
        The folder of the key or certificate files.

    Returns
    -------
    list of str
        The names of the files put in place (empty when there was nothing to finish).

    Raises
    ------
    PKIError
        The journal cannot be read, names something other than a file of the folder, or a rename
        fails (the message names the folder and the fix).
    """
    folder = Path(folder).expanduser()
    journal = folder / REPLACE_JOURNAL
    if not os.path.lexists(journal):
        _remove_dead_temporaries(folder)  # only once no journal names them (they are then never put in place)
        return []
    fix = (f"check {journal} (it lists the files a killed `fl-pki --force` was replacing), then run that fl-pki "
           "command again with --force")
    try:
        if journal.is_symlink() or journal.stat().st_size > 64 * 1024:
            raise ValueError("not a journal file")
        content = json.loads(journal.read_text())
        entries, writer = content["replace"], content.get("pid")
        names = [(e["tmp"], e["target"], e["backup"]) for e in entries]
        if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for t in names for n in t):
            raise ValueError("a name that is not a file of the folder")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PKIError(f"{folder}: an interrupted `fl-pki --force` left {REPLACE_JOURNAL}, which cannot be used "
                       f"({getattr(exc, 'strerror', None) or exc}); fix: {fix}") from None
    if isinstance(writer, int) and pid_alive(writer):
        return []  # a replacement in progress (here or in another process): its writer finishes it and reports it
    put = []
    try:
        for tmp, target, backup in names:
            if os.path.lexists(folder / tmp):
                os.replace(folder / tmp, folder / target)
                put.append(target)
            (folder / backup).unlink(missing_ok=True)
        journal.unlink()
        fsync_dir(folder)
        _remove_dead_temporaries(folder)
    except OSError as exc:
        raise PKIError(f"{folder}: cannot finish an interrupted `fl-pki --force` ({exc.strerror or exc}); fix: "
                       f"{fix}") from None
    return put


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)-[0-9a-f]{12}\.tmp")


def _remove_dead_temporaries(folder: Path) -> None:
    """Remove the temporaries (new key material, a journal) of fl-pki processes killed before their journal named them.

    Their names carry the writer's pid (``.<file>.<pid>-<hex>.tmp``); a live writer's are left alone. Errors are
    ignored: they are hidden files a later run removes, never read.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        m = _TEMPORARY.fullmatch(e.name)
        if m and e.is_file(follow_symlinks=False) and not pid_alive(int(m["pid"])):
            try:
                os.unlink(e.path)
            except OSError:
                pass


#: The largest public key file read (bytes): one OpenSSH line is under 300 bytes.
MAX_PUBLIC_KEY_FILE = 64 * 1024
#: The largest key or certificate file read (bytes): keys and certificates are a few KB, a CA bundle a few hundred.
MAX_PKI_FILE = 4 * 1024 * 1024


def _read(path: Path, what: str, fix: str) -> bytes:
    path = Path(path).expanduser()
    finish_interrupted_replace(path.parent)  # never read one half of a pair a killed --force was replacing
    if not path.exists():
        raise PKIError(f"{path}: {what} not found; fix: {fix}")
    if not path.is_file():
        raise PKIError(f"{path}: is not a file; fix: {fix}")
    try:
        size = path.stat().st_size
        if size > MAX_PKI_FILE:  # refused before it is read: a 200 MB "node.pub" is not loaded into memory
            raise PKIError(f"{path}: is {size / 1e6:,.0f} MB, far larger than any {what} (a few KB); it is another "
                           f"file; fix: {fix}")
        return path.read_bytes()
    except OSError as err:
        raise PKIError(f"{path}: cannot read {what} ({err.strerror}); fix: check its permissions") from None


def load_certificates(path: Path, what: str, fix: str, *, pem_for: str | None = None) -> list[x509.Certificate]:
    """The certificates in a PEM file (a bundle too) or a DER file.

    Parameters
    ----------
    path
        The certificate file.
    what
        What the file is, for the message ("certificate", "CA certificate").
    fix
        What the user should do when the file is missing, unreadable or not a certificate.
    pem_for
        An option such as ``--ca``: a DER file is then refused with the ``openssl`` command that
        converts it (Flower, gRPC and ``fl-client --ca`` read only PEM).

    Returns
    -------
    list of cryptography.x509.Certificate
        At least one; the leaf first for a chain file.

    Raises
    ------
    PKIError
        Naming the file, the problem and ``fix``.
    """
    data = _read(path, what, fix)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificates(data)
        certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise PKIError(f"{path}: is not a PEM or DER X.509 certificate; fix: {fix}") from None
    if pem_for is not None:
        pem = path.with_suffix(".pem" if path.suffix == ".crt" else ".crt")
        raise PKIError(f"{pem_for} {path}: is a DER (binary) certificate, but fl-client --ca, Flower and gRPC read only PEM; "
                       f"fix: convert it with `openssl x509 -inform der -in {path} -out {pem}` and pass {pem} to {pem_for}")
    return certs


def _name(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty)"


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)


def _san_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    return f"{type(name).__name__}:{name.value}"


def is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` carries the CA:TRUE basic constraint (a certificate authority's)."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _key_type(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    size = getattr(public_key, "key_size", None)
    return f"{type(public_key).__name__.removesuffix('PublicKey').lstrip('_')}{f' {size}' if size else ''}"


def _same_key(a: object, b: object) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)  # type: ignore[attr-defined]


def private_key_problem(key: Path, cert: x509.Certificate, cert_label: str) -> str | None:
    """Why the PEM file ``key`` is not ``cert``'s unencrypted private key; None when it is.

    One check for every server that takes a certificate and its key (``fl-server start``'s
    ``--cert``/``--key``, ``fl-serve``'s ``--tls-cert``/``--tls-key``); the caller adds the option
    name and its fix.

    Parameters
    ----------
    key : Path
        The private key file (readable: the caller has checked the path).
    cert : x509.Certificate
        The server certificate the key must belong to.
    cert_label : str
        How the message names the certificate, e.g. ``"--cert server.crt"``.

    Returns
    -------
    str or None
        ``"is encrypted (...)"``, ``"not a PEM private key (...)"`` or ``"does not belong to ..."``.
    """
    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except TypeError:
        return "is encrypted (a server cannot ask for its passphrase)"
    except (ValueError, UnsupportedAlgorithm):
        return "not a PEM private key (a certificate or public key?)"
    if not _same_key(private.public_key(), cert.public_key()):
        return f"does not belong to {cert_label} (another key pair's private key)"
    return None


# --------------------------------------------------------------------------- SANs


def parse_san(value: str, flag: str = "--san") -> x509.GeneralName:
    """Turn one ``--san`` value into an X.509 subject alternative name.

    Parameters
    ----------
    value : str
        An IPv4/IPv6 address (``10.0.0.5``, ``::1``, ``[::1]``) or a DNS host name
        (``coord.city.example``, ``localhost``). Surrounding whitespace and one trailing dot
        are ignored; host names are lower-cased.
    flag : str
        The option the value came from, named in error messages (``--san``, ``--host``).

    Returns
    -------
    cryptography.x509.GeneralName
        An :class:`~cryptography.x509.IPAddress` for addresses, a
        :class:`~cryptography.x509.DNSName` otherwise.

    Raises
    ------
    PKIError
        If ``value`` is neither; the message quotes the value and says what to pass instead.
        Wildcards are refused (list every host name), as are non-ASCII names (pass the
        ``xn--`` form), dotted numbers that are not a valid IP address, and the unspecified
        address (``0.0.0.0``, ``::``: servers listen on it, no client dials it).
    """
    f = flag
    shown = shown_value(value)  # a value is quoted cut: a 400-character --san is not echoed whole
    if not isinstance(value, str):
        raise PKIError(f"{f} {shown} is not text; pass a host name or an IP address")
    text = value.strip()
    fix = "pass a host name like coord.city.example or an IP address like 10.0.0.5"
    if not text:
        raise PKIError(f"{f} {shown} is empty; {fix}")
    if not text.isascii():
        raise PKIError(f"{f} {shown} contains non-ASCII characters; pass the IDNA (xn--...) form of the name")
    if "," in text or any(c.isspace() for c in text):
        raise PKIError(f"{f} {shown} contains a comma or whitespace; "
                       f"{'pass one --san per name' if f == '--san' else f'pass one host name to {f}'}")
    bracketed = text.startswith("[") and text.endswith("]")
    candidate = text[1:-1] if bracketed else text
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise PKIError(f"{f} {shown} has an IPv6 zone (%...); certificates cannot name one, drop it")
        if bracketed and ip.version != 6:
            raise PKIError(f"{f} {shown}: only IPv6 addresses go in brackets; pass {candidate}")
        if ip.is_unspecified:
            raise PKIError(f"{f} {shown} is the unspecified address: a server listens on it, but no client dials "
                           "it, so a certificate naming it covers nothing; fix: pass the addresses clients dial, "
                           "e.g. 127.0.0.1 and the coordinator's LAN address or host name")
        return x509.IPAddress(ip)
    if bracketed:
        raise PKIError(f"{f} {shown} is bracketed but not an IPv6 address; {fix}")
    if "*" in text:
        raise PKIError(f"{f} {shown} is a wildcard; wildcards are not issued, "
                       f"{'pass each host name with its own --san' if f == '--san' else f'pass one host name to {f}'}")
    if "://" in text or "/" in text or ":" in text:
        raise PKIError(f"{f} {shown} looks like a URL or host:port; pass only the host part, e.g. {f} coord.city.example")
    name = text.lower()
    if name.endswith(".") and name != ".":
        name = name[:-1]
    if len(name) > 253:
        raise PKIError(f"{f} {shown} is longer than 253 characters; {fix}")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise PKIError(f"{f} {shown} has an empty label (leading dot or two dots in a row); {fix}")
        if len(label) > 63:
            raise PKIError(f"{f} {shown} has a label longer than 63 characters; {fix}")
        if not _LABEL.fullmatch(label):
            raise PKIError(
                f"{f} {shown}: label {shown_value(label)} may only hold letters, digits and inner hyphens; {fix}"
            )
    if labels[-1].isdigit():
        raise PKIError(f"{f} {shown} looks like an IP address but is not a valid one; check the numbers")
    return x509.DNSName(name)


def parse_sans(values: Iterable[str]) -> list[x509.GeneralName]:
    """Parse several ``--san`` values, dropping duplicates and keeping their order.

    Parameters
    ----------
    values : iterable of str
        The raw values, see :func:`parse_san`.

    Returns
    -------
    list of cryptography.x509.GeneralName
        At least one name.

    Raises
    ------
    PKIError
        If any value is invalid, or if there are none.
    """
    names: list[x509.GeneralName] = []
    for value in values:
        name = parse_san(value)
        if name not in names:
            names.append(name)
    if not names:
        raise PKIError("no SAN given; pass at least one --san (every name or IP clients dial)")
    return names


# --------------------------------------------------------------------------- CA


def create_ca(
    out: Path,
    name: str = "City FL CA",
    *,
    days: int = 3650,
    curve: str = "p384",
    force: bool = False,
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """Create the city CA: ``ca.key`` (0600) and the self-signed ``ca.crt`` (0644).

    Parameters
    ----------
    out : Path
        Directory to write into (created with mode 0700 if missing).
    name : str
        The CA's common name, e.g. ``"City of Cleveland FL CA"`` (1-64 characters).
    days : int
        Validity in days from ``now``.
    curve : {"p384", "p256"}
        Elliptic curve of the CA key.
    force : bool
        Replace an existing ``ca.key``/``ca.crt``. Without it nothing is overwritten.
    now : datetime, optional
        Issue time (aware); defaults to the current time. Tests use it to make old CAs.

    Returns
    -------
    tuple of Path
        ``(key_path, cert_path)``.

    Raises
    ------
    PKIError
        On an invalid name, days or curve, or if the files exist and ``force`` is false.
    """
    now = _utcnow(now)
    not_after = _not_after(days, "CA", now)
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 64 or any(c in name for c in "\r\n\0"):
        raise PKIError(f"--name {shown_value(name)} is invalid; pass a one-line CA name of 1-64 characters")
    key = ec.generate_private_key(_curve(curve))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name.strip())])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, _hash_for(key))
    )
    return _write_key_and_cert(out, CA_KEY, CA_CERT, key, cert, force)


def _write_key_and_cert(out: Path, key_name: str, cert_name: str, key: ec.EllipticCurvePrivateKey,
                        cert: x509.Certificate, force: bool) -> tuple[Path, Path]:
    """Write a private key (0600) and its certificate (0644) into ``out`` (created if missing); return both paths."""
    key_path, cert_path = _write_into(
        out,
        [
            (key_name, _pem_private_key(key), PRIVATE_MODE),
            (cert_name, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE),
        ],
        force,
    )
    return key_path, cert_path


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_ca(ca_dir: Path, *, now: datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load and sanity-check the CA written by :func:`create_ca`.

    Parameters
    ----------
    ca_dir : Path
        Directory holding ``ca.key`` and ``ca.crt``.
    now : datetime, optional
        Time at which the CA must be valid; defaults to now.

    Returns
    -------
    tuple
        ``(ca_certificate, ca_private_key)``.

    Raises
    ------
    PKIError
        If a file is missing or unreadable, ``ca.key`` is readable by others, the key does not
        match the certificate, the certificate is not a CA or is outside its validity.
    """
    now = _utcnow(now)
    ca_dir = Path(ca_dir).expanduser()
    init_fix = f"pass the directory made by `fl-pki init --out {ca_dir}` as --ca-dir"
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    certs = load_certificates(cert_path, "CA certificate", init_fix)
    cert = certs[0]
    key_bytes = _read(key_path, "CA private key", init_fix)
    if os.name == "posix" and key_path.stat().st_mode & 0o077:
        mode = key_path.stat().st_mode & 0o777
        raise PKIError(f"{key_path}: CA private key is readable by others (mode {mode:04o}); fix: chmod 600 {key_path}")
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except TypeError:
        raise PKIError(f"{key_path}: is encrypted; fix: fl-pki expects the unencrypted key written by `fl-pki init`") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{key_path}: is not a PEM private key; fix: {init_fix}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{key_path}: is not an EC key; fix: create the CA with `fl-pki init`")
    if not _same_key(key.public_key(), cert.public_key()):
        raise PKIError(f"{key_path}: does not belong to {cert_path}; fix: keep the ca.key/ca.crt pair from one `fl-pki init` together")
    if not is_ca(cert):
        raise PKIError(f"{cert_path}: is not a CA certificate (BasicConstraints CA=false); fix: {init_fix}")
    if now > cert.not_valid_after_utc:
        raise PKIError(
            f"{cert_path}: CA expired on {cert.not_valid_after_utc:%Y-%m-%d}; fix: create a new CA with "
            "`fl-pki init --force`, reissue server.crt and redistribute ca.crt"
        )
    if now < cert.not_valid_before_utc:
        raise PKIError(f"{cert_path}: CA is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; fix: check this machine's clock")
    return cert, key


# --------------------------------------------------------------------------- server certificate


def issue_server_cert(
    ca_dir: Path,
    out: Path,
    sans: Iterable[str],
    *,
    days: int = 825,
    curve: str = "p384",
    force: bool = False,
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue the coordinator's TLS key ``server.key`` (0600) and ``server.crt`` (0644).

    The certificate carries every SAN (IP addresses as IPAddress names, the rest as
    DNSName), ExtendedKeyUsage serverAuth, and key identifiers linking it to the CA, so
    Python's ``ssl``, gRPC (the SuperLink) and uvicorn all accept it for those names.

    Parameters
    ----------
    ca_dir : Path
        Directory with ``ca.key`` and ``ca.crt`` (see :func:`create_ca`).
    out : Path
        Directory to write into (created with mode 0700 if missing).
    sans : iterable of str
        Every host name and IP address clients use to reach the coordinator.
    days : int
        Validity in days from ``now``; must end before the CA expires.
    curve : {"p384", "p256"}
        Elliptic curve of the server key.
    force : bool
        Replace an existing ``server.key``/``server.crt``.
    now : datetime, optional
        Issue time (aware); defaults to the current time.

    Returns
    -------
    tuple of Path
        ``(key_path, cert_path)``.

    Raises
    ------
    PKIError
        On a bad SAN, days or curve, an unusable CA, a lifetime past the CA's, or existing
        files without ``force``.
    """
    now = _utcnow(now)
    names = parse_sans(sans)
    _check_days(days, "server certificate")
    ca_cert, ca_key = load_ca(ca_dir, now=now)
    not_after = _not_after(days, "server certificate", now, ca_cert, Path(ca_dir).expanduser() / CA_CERT)
    key = ec.generate_private_key(_curve(curve))
    first = names[0]
    cn = next((n.value for n in names if isinstance(n, x509.DNSName)), str(first.value))
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - CLOCK_SKEW, ca_cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )
    return _write_key_and_cert(out, SERVER_KEY, SERVER_CERT, key, cert, force)


# --------------------------------------------------------------------------- node keys


def ssh_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """OpenSSH-style fingerprint of a public key, as ``ssh-keygen -lf`` prints it.

    Parameters
    ----------
    public_key : cryptography public key
        Any key type OpenSSH can encode.

    Returns
    -------
    str
        ``"SHA256:"`` followed by the unpadded base64 SHA-256 of the key blob.
    """
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _fl_client_site_rule(site: str) -> str | None:
    """Why ``fl-client --site`` refuses ``site`` (its ``check_site_name``), or ``None``."""
    if "/" in site or "\\" in site:
        return "it holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in site):
        return "it holds a control character"
    if site.strip() in ("", ".", ".."):
        return "it is empty, '.' or '..'"
    if len(site) > MAX_SITE_NAME:
        return f"it is longer than {MAX_SITE_NAME} characters"
    return None


def _breaks_comment(c: str) -> bool:
    """Whether ``c`` cannot stand in node.pub's one-line ``cityfed:<department>:<site>`` comment."""
    return c == ":" or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")


def check_node_fields(department: str, site: str) -> None:
    """Refuse a ``--department`` or ``--site`` that ``fl-pki node-key`` cannot record.

    The department is one of :data:`DEPARTMENTS`. The site is any name ``fl-client --site``
    accepts (the data file's site name, e.g. ``"VA Long Beach"``; no path separator or control
    character, not ``.`` or ``..``, at most 100 characters) that also fits node.pub's one-line
    comment ``cityfed:<department>:<site>``: no ``:``, no line or paragraph separator, no
    leading or trailing space. The comment is only a label the coordinator sees
    (``fl-server register`` names the node after it); nothing checks it against ``fl-client --site``.

    Raises
    ------
    PKIError
        Naming the option, the value and the fix: a did-you-mean for a misspelt department,
        and for a site ``fl-client`` accepts, a replacement both tools accept.
    """
    if not isinstance(department, str) or department not in DEPARTMENTS:
        close = difflib.get_close_matches(department.lower(), DEPARTMENTS, n=1, cutoff=0.6) \
            if isinstance(department, str) else []
        fix = (f"pass --department {close[0]} (did you mean {close[0]!r}?)" if close
               else "pass the department whose records this machine holds, e.g. --department health")
        raise PKIError(f"--department {shown_value(department)} is invalid: the city's departments are "
                       f"{', '.join(DEPARTMENTS)}; fix: {fix}")
    if not isinstance(site, str):
        raise PKIError(f"--site {shown_value(site)} is invalid: not text; fix: pass the site's name, e.g. --site Cleveland")
    rule = _fl_client_site_rule(site)
    if rule is not None:
        raise PKIError(f"--site {shown_value(site)} is invalid: {rule} (fl-client refuses it too: the site names the node's "
                       "state folder and ledger key); fix: pass the site as the department's data file names it, "
                       "e.g. --site Cleveland or --site 'VA Long Beach'")
    bad = sorted({c for c in site if _breaks_comment(c)})
    if bad or site != site.strip():
        what = (f"it holds {', '.join(map(repr, bad[:5]))}{', ...' if len(bad) > 5 else ''}" if bad else "") + \
            (" and " if bad and site != site.strip() else "") + \
            ("it starts or ends with a space" if site != site.strip() else "")
        better = "".join("-" if _breaks_comment(c) else c for c in site).strip()
        raise PKIError(f"--site {site!r} is invalid in a node key: {what}, which node.pub's one-line comment "
                       f"cityfed:<department>:<site> cannot hold (the site there is only a label for the "
                       f"coordinator); fix: pass --site {better!r} instead")


def create_node_key(
    out: Path, department: str, site: str, *, force: bool = False
) -> tuple[Path, Path, str]:
    """Create a department node's Flower authentication key pair.

    Writes ``node.key`` (0600, OpenSSH private key format, EC P-384: what
    ``flower-supernode --auth-supernode-private-key`` loads) and ``node.pub`` (0644,
    one OpenSSH public key line with comment ``cityfed:<department>:<site>``: what
    ``flwr supernode register`` loads). Nothing else in ``out`` is touched.

    Parameters
    ----------
    out : Path
        Directory on the department's own machine (created with mode 0700 if missing).
    department : str
        ``"health"``, ``"traffic"`` or ``"utility"``.
    site : str
        The site's name as ``fl-client --site`` takes it, e.g. ``"Cleveland"``,
        ``"VA Long Beach"`` (see :func:`check_node_fields`).
    force : bool
        Replace an existing pair. The old public key must then be re-registered.

    Returns
    -------
    tuple
        ``(key_path, pub_path, fingerprint)`` with the ``SHA256:...`` fingerprint.

    Raises
    ------
    PKIError
        On an invalid department or site, or existing files without ``force``.
    """
    check_node_fields(department, site)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public += f" cityfed:{department}:{site}\n".encode()
    key_path, pub_path = _write_into(out, [(NODE_KEY, private, PRIVATE_MODE), (NODE_PUB, public, PUBLIC_MODE)], force)
    return key_path, pub_path, ssh_fingerprint(key.public_key())


def _is_der_private_key(data: bytes) -> bool:
    """Whether ``data`` is a private key in DER (binary) form, plain or password-protected."""
    if not data.startswith(b"\x30"):  # every DER private key is an ASN.1 SEQUENCE
        return False
    try:
        serialization.load_der_private_key(data, password=None)
    except TypeError:  # "password was not given but private key is encrypted": a private key all the same
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True


def load_public_key(path: Path) -> PublicKeyInfo:
    """Read an OpenSSH public key file (such as ``node.pub``).

    Parameters
    ----------
    path : Path
        The ``.pub`` file.

    Returns
    -------
    PublicKeyInfo
        Key type (e.g. ``ecdsa-sha2-nistp384``), curve, fingerprint and comment.

    Raises
    ------
    PKIError
        If the file is missing, is a private key, starts with a byte-order mark (BOM) or is not a
        single OpenSSH public key line.
    """
    path = Path(path).expanduser()
    data = _read(path, "public key", "pass the node.pub written by `fl-pki node-key`")
    if len(data) > MAX_PUBLIC_KEY_FILE:  # a node.pub is one line of under 300 bytes; its comment is printed
        raise PKIError(f"{path}: is {len(data):,} bytes, far larger than an OpenSSH public key line (under 1 KB); it "
                       "is another file; fix: hand over the node.pub written by `fl-pki node-key`")
    if b"PRIVATE KEY" in data or _is_der_private_key(data):
        raise PKIError(f"{path}: is a private key (node.key), which must never leave the department's machine; fix: hand "
                       "over node.pub instead. As this private key has now been copied, make a new key on the department's "
                       "machine (`fl-pki node-key ... --force`) and register that node.pub")
    if data.startswith(UTF8_BOM):  # Flower reads the file itself and refuses it too: named, not stripped
        raise PKIError(f"{path}: the file starts with a byte-order mark (BOM), which an OpenSSH public key file does not "
                       f"have (an editor saved it as 'UTF-8 with BOM'); fix: {BOM_FIX}, or hand over the node.pub from "
                       "`fl-pki node-key` unedited")
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise PKIError(f"{path}: expected exactly one OpenSSH public key line, found {len(lines)}; fix: hand over the node.pub from `fl-pki node-key`")
    try:
        key = serialization.load_ssh_public_key(lines[0].encode())
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{path}: is not an OpenSSH public key; fix: hand over the node.pub from `fl-pki node-key` (never node.key)") from None
    try:  # Flower (`flwr supernode register`) loads the whole file as one key: a comment or blank line first fails there
        serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{path}: holds comment or blank lines besides its key line, which Flower's key loader refuses; "
                       "fix: keep only the key line (as `fl-pki node-key` wrote it), or hand over that node.pub "
                       "unedited") from None
    parts = lines[0].split(None, 2)
    curve = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else "-"
    return PublicKeyInfo(path, parts[0], curve, ssh_fingerprint(key), parts[2].strip() if len(parts) > 2 else "")


# --------------------------------------------------------------------------- inspection / verification


def describe_certificates(path: Path, *, now: datetime | None = None) -> list[CertInfo]:
    """Describe every certificate in a PEM (possibly a bundle) or DER file.

    Parameters
    ----------
    path : Path
        Certificate file.
    now : datetime, optional
        Reference time for ``days_left``/``status``; defaults to now.

    Returns
    -------
    list of CertInfo
        One entry per certificate, in file order.

    Raises
    ------
    PKIError
        If the file is missing or holds no certificate.
    """
    now = _utcnow(now)
    path = Path(path).expanduser()
    infos = []
    for cert in load_certificates(path, "certificate", "pass a .crt file written by fl-pki"):
        infos.append(
            CertInfo(
                path=path,
                subject=_name(cert.subject),
                issuer=_name(cert.issuer),
                sans=tuple(_san_text(n) for n in _sans(cert)),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                now=now,
                is_ca=is_ca(cert),
                key_type=_key_type(cert.public_key()),
                sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
            )
        )
    return infos


def validity_problem(cert: x509.Certificate, *, now: datetime | None = None, restart: str = "the coordinator") -> str | None:
    """Why ``cert`` is not within its validity period now, with the fix; None when it is.

    ``fl-pki verify``, ``fl-server start`` and ``fl-server console`` refuse a certificate with it.

    Parameters
    ----------
    cert : x509.Certificate
        The certificate.
    now : datetime, optional
        Reference time; defaults to now.
    restart : str
        What to restart with a new certificate, for the fix (``"the coordinator"``).

    Returns
    -------
    str or None
        ``"expired on ... (N days ago); fix: ..."`` or ``"not valid before ...; fix: ..."``.
    """
    now = _utcnow(now)
    if now > cert.not_valid_after_utc:
        ago = (now - cert.not_valid_after_utc) // timedelta(days=1)
        return (f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({ago} days ago); "
                f"fix: issue a new one with `fl-pki server-cert --force` and restart {restart}")
    if now < cert.not_valid_before_utc:
        return (f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; fix: check this machine's clock "
                "(`date -u`), or issue a new one with `fl-pki server-cert --force`")
    return None


#: Extension OIDs the strict validator names -> their name in words.
_EXTENSION_NAMES = {
    "2.5.29.35": "Authority Key Identifier", "2.5.29.14": "Subject Key Identifier", "2.5.29.15": "Key Usage",
    "2.5.29.37": "Extended Key Usage", "2.5.29.17": "Subject Alternative Name", "2.5.29.19": "Basic Constraints",
    "2.5.29.30": "Name Constraints", "2.5.29.32": "Certificate Policies",
}
#: The fix for a certificate that strict validation refuses.
_REISSUE = ("reissue it with `fl-pki server-cert --ca-dir <CA directory> --out <folder> --san <each name clients dial>`, "
            "which writes every extension strict validation needs")


def explain_verification_error(err: Exception) -> str:
    """Say in plain words why ``cryptography``'s strict RFC 5280 validator refused a certificate.

    The validator's messages (``validation failed: invalid extension: 2.5.29.35: Certificate is
    missing required extension (encountered processing <Certificate(...)>)``) name extensions by
    OID and end with Python object text; this names the extension, the certificate (by subject)
    and the fix.

    Parameters
    ----------
    err : Exception
        The ``VerificationError`` (or its text).

    Returns
    -------
    str
        ``"<problem>; fix: <fix>"``.
    """
    text = str(err).strip()
    subject = re.search(r"<Certificate\(subject=<Name\(([^)]*)\)>", text)
    text = re.sub(r"\s*\(encountered processing <Certificate\(.*\)>\)\s*$", "", text, flags=re.S)
    text = text.removeprefix("validation failed:").strip()
    who = f"the certificate {subject.group(1)}" if subject else "the certificate"
    ext = re.fullmatch(r"invalid extension: ([0-9.]+): (.*)", text, flags=re.S)
    if ext:
        oid, why = ext.groups()
        label = _EXTENSION_NAMES.get(oid, oid)
        if "missing required extension" in why.lower():
            problem = f"{who} has no {label} extension, which strict RFC 5280 validation requires"
        elif "critical" in why.lower():
            shown = label if label == oid else f"{label} (OID {oid})"
            problem = f"{who} carries the critical extension {shown}, which strict RFC 5280 validation does not accept"
        else:
            problem = f"{who}'s {label} extension is not acceptable to strict RFC 5280 validation ({why.rstrip('.')})"
    elif "keyusage" in text.lower().replace(" ", ""):
        problem = f"{who}'s Key Usage extension is not that of a server certificate ({text})"
    elif "eku" in text.lower():
        problem = (f"{who}'s Extended Key Usage does not allow TLS server authentication (serverAuth) ({text})")
    elif "basicconstraints" in text.lower().replace(" ", ""):
        problem = f"{who}'s Basic Constraints are not those of a server certificate ({text})"
    else:
        problem = f"{who} failed strict RFC 5280 validation ({text})"
    return f"{problem}; fix: {_REISSUE}"


def verify_server_cert(
    ca: Path, cert: Path, host: str | None = None, *, now: datetime | None = None
) -> VerifyResult:
    """Check that a server certificate chains to the CA, is in date and covers the host.

    The final word is ``cryptography``'s RFC 5280 path validator
    (``PolicyBuilder().store(...).build_server_verifier``), run for ``host`` or, without
    one, for every SAN in the certificate. Checks done first give specific messages.

    Parameters
    ----------
    ca : Path
        The CA certificate (``ca.crt``); a PEM bundle of several CAs is accepted.
    cert : Path
        The server certificate; further certificates in the file are used as intermediates.
    host : str, optional
        Host name or IP address clients dial.
    now : datetime, optional
        Validation time; defaults to now.

    Returns
    -------
    VerifyResult
        The names that verified and the remaining lifetime.

    Raises
    ------
    CertificateInvalid
        If the certificate is expired or not yet valid, not signed by the CA, does not cover
        ``host``, or otherwise fails path validation.
    PKIError
        If a file is missing or unreadable, ``ca`` is not a CA, or ``host`` is not a valid name.
    """
    now = _utcnow(now)
    ca_path, cert_path = Path(ca).expanduser(), Path(cert).expanduser()
    roots = load_certificates(ca_path, "CA certificate", "pass the city's ca.crt to --ca", pem_for="--ca")
    chain = load_certificates(cert_path, "certificate", "pass the server.crt to check to --cert", pem_for="--cert")
    leaf, intermediates = chain[0], chain[1:]
    if not any(is_ca(r) for r in roots):
        raise PKIError(f"{ca_path}: is not a CA certificate; fix: pass the city's ca.crt to --ca (and server.crt to --cert)")
    dates = validity_problem(leaf, now=now, restart="the coordinator")
    if dates:
        raise CertificateInvalid(f"{cert_path}: {dates}")
    issuers = [r for r in [*roots, *intermediates] if r.subject == leaf.issuer]
    signed = False
    for issuer in issuers:
        try:
            leaf.verify_directly_issued_by(issuer)
            signed = True
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    if not signed:
        raise CertificateInvalid(
            f"{cert_path}: was not signed by the CA in {ca_path} (certificate issuer: {_name(leaf.issuer)}; "
            f"CA: {', '.join(_name(r.subject) for r in roots)}); fix: verify against the CA that issued it, "
            "or reissue with `fl-pki server-cert --ca-dir <this CA's directory>`"
        )
    sans = _sans(leaf)
    if host is not None:
        names = [parse_san(host, "--host")]
        if names[0] not in sans:
            raise CertificateInvalid(
                f"{cert_path}: does not cover {shown_value(host)} (its SANs: {', '.join(map(_san_text, sans)) or 'none'}); "
                f"fix: reissue with `fl-pki server-cert ... --san {host}` plus the existing SANs"
            )
    else:
        names = [n for n in sans if isinstance(n, (x509.DNSName, x509.IPAddress))]
        if not names:
            raise CertificateInvalid(f"{cert_path}: has no DNS or IP SAN, so no TLS client accepts it; fix: reissue with `fl-pki server-cert --san ...`")
    builder = PolicyBuilder().store(Store(roots)).time(now)
    for name in names:
        try:
            builder.build_server_verifier(name).verify(leaf, intermediates)
        except VerificationError as err:
            raise CertificateInvalid(f"{cert_path}: failed validation against {ca_path} for {_san_text(name)}: "
                                     f"{explain_verification_error(err)}") from None
    return VerifyResult(
        names=tuple(_san_text(n) for n in names),
        not_after=leaf.not_valid_after_utc,
        days_left=(leaf.not_valid_after_utc - now) // timedelta(days=1),
    )
