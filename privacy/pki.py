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
import hashlib
import ipaddress
import os
import re
import secrets
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

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NODE_FIELD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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


def _curve(curve: str) -> ec.EllipticCurve:
    try:
        return CURVES[curve.lower()]
    except KeyError:
        raise PKIError(f"--curve {curve!r} is not supported; use one of {', '.join(CURVES)}") from None


def _hash_for(key: ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


def _prepare_dir(out: Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise PKIError(f"{out}: exists and is not a directory; fix: pass a directory to --out")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    return out


def _write_files(files: Sequence[tuple[Path, bytes, int]], *, force: bool) -> None:
    """Write ``(path, data, mode)`` triples; refuse up front if any exists and not ``force``.

    Each file is created by ``os.open`` with its final mode (private keys are never readable
    by others, not even for an instant). Without ``force`` the target itself is created with
    ``O_EXCL``; with ``force`` a fresh temporary file is renamed over it, so the old file's
    (possibly looser) mode is not inherited.
    """
    if not force:
        existing = [str(p) for p, _, _ in files if os.path.lexists(p)]
        if existing:
            raise PKIError(
                f"{', '.join(existing)}: already exist{'s' if len(existing) == 1 else ''}; refusing to overwrite key material. "
                "Fix: pass --force to replace it (anything signed or registered with the old "
                "key stops working), or choose another --out directory"
            )
    for path, data, mode in files:
        target = path
        if force:
            target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise PKIError(
                f"{path}: appeared while writing; fix: make sure no other fl-pki runs on the same "
                "directory, then run again"
            ) from None
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits from a public file's 0644
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if force:
                os.replace(target, path)
        except BaseException:
            Path(target).unlink(missing_ok=True)
            raise


def _read(path: Path, what: str, fix: str) -> bytes:
    path = Path(path).expanduser()
    if not path.exists():
        raise PKIError(f"{path}: {what} not found; fix: {fix}")
    if not path.is_file():
        raise PKIError(f"{path}: is not a file; fix: {fix}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise PKIError(f"{path}: cannot read {what} ({err.strerror}); fix: check its permissions") from None


def _load_certs(path: Path, what: str, fix: str) -> list[x509.Certificate]:
    data = _read(path, what, fix)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise PKIError(f"{path}: is not a PEM or DER X.509 certificate; fix: {fix}") from None


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


def _is_ca(cert: x509.Certificate) -> bool:
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


# --------------------------------------------------------------------------- SANs


def parse_san(value: str) -> x509.GeneralName:
    """Turn one ``--san`` value into an X.509 subject alternative name.

    Parameters
    ----------
    value : str
        An IPv4/IPv6 address (``10.0.0.5``, ``::1``, ``[::1]``) or a DNS host name
        (``coord.city.example``, ``localhost``). Surrounding whitespace and one trailing dot
        are ignored; host names are lower-cased.

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
        ``xn--`` form) and dotted numbers that are not a valid IP address.
    """
    if not isinstance(value, str):
        raise PKIError(f"SAN {value!r} is not text; pass a host name or an IP address")
    text = value.strip()
    fix = "pass a host name like coord.city.example or an IP address like 10.0.0.5"
    if not text:
        raise PKIError(f"SAN {value!r} is empty; {fix}")
    if not text.isascii():
        raise PKIError(f"SAN {value!r} contains non-ASCII characters; pass the IDNA (xn--...) form of the name")
    if "," in text or any(c.isspace() for c in text):
        raise PKIError(f"SAN {value!r} contains a comma or whitespace; pass one --san per name")
    bracketed = text.startswith("[") and text.endswith("]")
    candidate = text[1:-1] if bracketed else text
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise PKIError(f"SAN {value!r} has an IPv6 zone (%...); certificates cannot name one, drop it")
        if bracketed and ip.version != 6:
            raise PKIError(f"SAN {value!r}: only IPv6 addresses go in brackets; pass {candidate}")
        return x509.IPAddress(ip)
    if bracketed:
        raise PKIError(f"SAN {value!r} is bracketed but not an IPv6 address; {fix}")
    if "*" in text:
        raise PKIError(f"SAN {value!r} is a wildcard; wildcards are not issued, pass each host name with its own --san")
    if "://" in text or "/" in text or ":" in text:
        raise PKIError(f"SAN {value!r} looks like a URL or host:port; pass only the host part, e.g. coord.city.example")
    name = text.lower()
    if name.endswith(".") and name != ".":
        name = name[:-1]
    if len(name) > 253:
        raise PKIError(f"SAN {value!r} is longer than 253 characters; {fix}")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise PKIError(f"SAN {value!r} has an empty label (leading dot or two dots in a row); {fix}")
        if len(label) > 63:
            raise PKIError(f"SAN {value!r} has a label longer than 63 characters; {fix}")
        if not _LABEL.fullmatch(label):
            raise PKIError(
                f"SAN {value!r}: label {label!r} may only hold letters, digits and inner hyphens; {fix}"
            )
    if labels[-1].isdigit():
        raise PKIError(f"SAN {value!r} looks like an IP address but is not a valid one; check the numbers")
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
    _check_days(days, "CA")
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 64 or any(c in name for c in "\r\n\0"):
        raise PKIError(f"--name {name!r} is invalid; pass a one-line CA name of 1-64 characters")
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
        .not_valid_after(now + timedelta(days=days))
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
    return _write_key_and_cert(_prepare_dir(out), CA_KEY, CA_CERT, key, cert, force)


def _write_key_and_cert(out: Path, key_name: str, cert_name: str, key: ec.EllipticCurvePrivateKey,
                        cert: x509.Certificate, force: bool) -> tuple[Path, Path]:
    """Write a private key (0600) and its certificate (0644) into ``out``; return both paths."""
    key_path, cert_path = out / key_name, out / cert_name
    _write_files(
        [
            (key_path, _pem_private_key(key), PRIVATE_MODE),
            (cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE),
        ],
        force=force,
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
    certs = _load_certs(cert_path, "CA certificate", init_fix)
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
    if not _is_ca(cert):
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
    not_after = now + timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        left = (ca_cert.not_valid_after_utc - now) // timedelta(days=1)
        raise PKIError(
            f"{Path(ca_dir) / CA_CERT}: CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before the "
            f"requested {days} days; fix: pass --days {max(left, 1)} or less, or renew the CA"
        )
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
    return _write_key_and_cert(_prepare_dir(out), SERVER_KEY, SERVER_CERT, key, cert, force)


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
    department, site : str
        Letters, digits, ``.``, ``_``, ``-`` (1-64 characters, starting with a letter or
        digit), e.g. ``"health"``, ``"Cleveland"``.
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
    for flag, value in (("--department", department), ("--site", site)):
        if not isinstance(value, str) or not _NODE_FIELD.fullmatch(value):
            raise PKIError(
                f"{flag} {value!r} is invalid; use 1-64 letters, digits, '.', '_' or '-' "
                "(e.g. 'public-works', 'East-Side'), no spaces or colons"
            )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public += f" cityfed:{department}:{site}\n".encode()
    out = _prepare_dir(out)
    key_path, pub_path = out / NODE_KEY, out / NODE_PUB
    _write_files([(key_path, private, PRIVATE_MODE), (pub_path, public, PUBLIC_MODE)], force=force)
    return key_path, pub_path, ssh_fingerprint(key.public_key())


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
        If the file is missing or is not a single OpenSSH public key line.
    """
    path = Path(path).expanduser()
    data = _read(path, "public key", "pass the node.pub written by `fl-pki node-key`")
    if b"PRIVATE KEY" in data:
        raise PKIError(f"{path}: is a private key (node.key), which must never leave the department's machine; fix: hand "
                       "over node.pub instead. As this private key has now been copied, make a new key on the department's "
                       "machine (`fl-pki node-key ... --force`) and register that node.pub")
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise PKIError(f"{path}: expected exactly one OpenSSH public key line, found {len(lines)}; fix: hand over the node.pub from `fl-pki node-key`")
    try:
        key = serialization.load_ssh_public_key(lines[0].encode())
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{path}: is not an OpenSSH public key; fix: hand over the node.pub from `fl-pki node-key` (never node.key)") from None
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
    for cert in _load_certs(path, "certificate", "pass a .crt file written by fl-pki"):
        infos.append(
            CertInfo(
                path=path,
                subject=_name(cert.subject),
                issuer=_name(cert.issuer),
                sans=tuple(_san_text(n) for n in _sans(cert)),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                now=now,
                is_ca=_is_ca(cert),
                key_type=_key_type(cert.public_key()),
                sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
            )
        )
    return infos


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
    roots = _load_certs(ca_path, "CA certificate", "pass the city's ca.crt to --ca")
    chain = _load_certs(cert_path, "certificate", "pass the server.crt to check to --cert")
    leaf, intermediates = chain[0], chain[1:]
    if not any(_is_ca(r) for r in roots):
        raise PKIError(f"{ca_path}: is not a CA certificate; fix: pass the city's ca.crt to --ca (and server.crt to --cert)")
    if now > leaf.not_valid_after_utc:
        ago = (now - leaf.not_valid_after_utc) // timedelta(days=1)
        raise CertificateInvalid(
            f"{cert_path}: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({ago} days ago); "
            "fix: issue a new one with `fl-pki server-cert --force` and restart the coordinator"
        )
    if now < leaf.not_valid_before_utc:
        raise CertificateInvalid(
            f"{cert_path}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; fix: check this machine's clock"
        )
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
        names = [parse_san(host)]
        if names[0] not in sans:
            raise CertificateInvalid(
                f"{cert_path}: does not cover {host!r} (its SANs: {', '.join(map(_san_text, sans)) or 'none'}); "
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
            raise CertificateInvalid(f"{cert_path}: failed validation against {ca_path} for {_san_text(name)}: {err}") from None
    return VerifyResult(
        names=tuple(_san_text(n) for n in names),
        not_after=leaf.not_valid_after_utc,
        days_left=(leaf.not_valid_after_utc - now) // timedelta(days=1),
    )
