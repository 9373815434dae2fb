"""Tamper-evident, append-only audit log for department nodes and the coordinator.

Who writes what
---------------
* a **department node** keeps ``<node state-dir>/audit.jsonl``, signed with its Flower node
  key ``node.key`` (OpenSSH ECDSA P-384 from ``fl-pki node-key``); anyone holding
  ``node.pub`` can verify it (``fl-client audit verify``);
* the **coordinator** keeps ``<state-dir>/audit.jsonl``, signed with ``<state-dir>/audit.key``
  (EC P-256 PEM, made on first use by :func:`ensure_signing_key`, public half ``audit.pub``);
  ``fl-server`` records runs launched, nodes registered/unregistered and runs stopped, and
  the ServerApp records refused and excluded replies when ``$CITYFED_AUDIT_LOG`` /
  ``$CITYFED_AUDIT_KEY`` are set (``fl-server start`` sets them; see
  :func:`audit_log_from_env`).

Format
------
JSON lines, one entry per line, only ever appended::

    {"data":{...},"hash":"<hex>","kind":"run","prev":"<hex>","seq":1,"sig":"<base64>","time":"2026-12-02T10:11:12.123456+00:00"}

* ``seq``: 1, 2, 3, ... (consecutive, 1-based; equal to the line number);
* ``time``: ISO-8601 UTC time of the append;
* ``kind``: what happened (``run``, ``register``, ``refused``, ...); ``data``: its fields;
* ``prev``: the ``hash`` of the previous entry (``"0" * 64`` for the first);
* ``hash``: hex SHA-256 of the entry's canonical JSON *without* ``hash`` and ``sig``;
* ``sig``: base64 of an ECDSA (SHA-256) signature over the 32 raw bytes of ``hash``
  (DER-encoded, as ``cryptography`` writes it); absent when the log has no key.

Canonical JSON is ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)``, and every line is stored exactly in that form (plus
``"\\n"``), so a changed byte is detected even where it would not change the parsed value.
Field values are coerced to JSON first (numpy scalars and arrays to numbers and lists,
``inf``/``-inf``/``nan`` to the strings ``"inf"``/``"-inf"``/``"nan"``, paths and datetimes
to strings, tuples and sets to lists, mapping keys to strings); anything else is an
:class:`AuditError`.

A replaced signing key (a new ``node.key``): the first append with the new key writes a
``key-changed`` entry (``data.key``: the new key's fingerprint) before its own, chained as usual and
signed by the new key. Entries between two ``key-changed`` entries form a key segment signed by
one key; :func:`verify` takes several public keys and reports the earlier segments whose key was
not given (``unchecked``): their content is still bound by the chain to the new key's entries.

``<log>.head`` holds the last entry's ``seq``, ``hash`` and ``signature`` (JSON), rewritten
atomically (temporary file, fsync, ``os.replace``) after every append; a new log gets a genesis
head (``seq`` 0) before its first entry, so a crash between an entry and its head always leaves a
head that lags (accepted) rather than none (a removed head). Appends hold an
exclusive ``fcntl.flock`` on the log file while they read the last entry (only the file's
tail is read: O(1) in the log's size), write, fsync and update the head, so several
processes (a node's ClientApp worker, ``fl-client app approve``) can append safely.

What :func:`verify` detects (and reports as the FIRST broken entry, by seq)
---------------------------------------------------------------------------
* any changed byte: a line that is not valid canonical JSON, a content/hash mismatch, a
  ``prev`` that does not match, a bad signature (with the public key), a head file that
  disagrees with the entry it names;
* a deleted, inserted or reordered entry (``seq`` not consecutive, ``prev`` chain broken);
* a cut tail (the log is shorter than its head file says) and a partial last line (a
  write interrupted by a crash: the next append discards those bytes and records a
  ``recovered`` entry with their length and SHA-256);
* with a public key: an entry that is unsigned or signed by another key.

Limits (threat model)
---------------------
The chain makes accidental damage and tampering by someone *without* the signing key
evident. It cannot stop someone who controls the machine and can read the key (root, or
the account that runs the node/coordinator): they can rewrite any entry, re-sign the whole
chain and rewrite the head, and the result verifies. Even without the key, anyone who can
write the files can cut the tail *and* rewrite the head to match: a prefix of a valid log
is a valid log. The defence against both is off-host anchoring: copy ``<log>.head`` (or the
output of ``audit export``) regularly to a machine the log's owner does not control, and
check against it with ``verify(..., anchor=copy)`` (``audit verify --anchor FILE``): a
rewritten or truncated history then no longer contains the anchored entry. Without the
public key, :func:`verify` checks the chain only and says signatures were not checked (and
a changed signature byte goes unnoticed). The log records what the writing software was
told to record; it is no evidence about events it never saw.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path, PurePath

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contract.files import fsync_dir  # noqa: F401  (re-exported: privacy.audit.fsync_dir)

#: Environment variables read by :func:`audit_log_from_env` (set by ``fl-server start`` for
#: the SuperLink it launches, inherited by its SuperExec and ServerApp processes).
ENV_LOG = "CITYFED_AUDIT_LOG"
ENV_KEY = "CITYFED_AUDIT_KEY"

#: ``prev`` of the first entry.
GENESIS = "0" * 64
#: Suffix of the sidecar head file.
HEAD_SUFFIX = ".head"

_FIELDS = {"seq", "time", "kind", "data", "prev", "hash"}
_TAIL_CHUNK = 4096


class AuditError(Exception):
    """An audit-log problem, phrased for the operator: the file, what is wrong, and the fix."""


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes
    ----------
    ok : bool
        True when the whole log (and its head file) is intact.
    entries : int
        Complete entries read (lines up to the first broken one when not ok).
    first_bad : int or None
        1-based seq (= line number) of the first broken or missing entry; None when ok, or
        when the problem is not one entry's (e.g. the head file is missing).
    reason : str
        What was checked, or what is wrong with which entry.
    signatures_checked : bool
        Whether signatures were verified against a public key.
    unchecked : tuple of (int, int)
        Seq ranges (first, last) of earlier key segments (before a ``key-changed`` entry)
        signed by a key that was not given: chained to the checked entries, their own
        signatures not checked.
    """

    ok: bool
    entries: int
    first_bad: int | None
    reason: str
    signatures_checked: bool = False
    unchecked: tuple[tuple[int, int], ...] = ()


# --------------------------------------------------------------------------- JSON


#: Kind of the entry that starts a key segment (the log's signing key was replaced).
KEY_CHANGED = "key-changed"


def canonical(obj) -> bytes:
    """The canonical JSON bytes of ``obj`` (sorted keys, no spaces, ASCII, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def entry_hash(entry: Mapping) -> str:
    """Hex SHA-256 of ``entry``'s canonical JSON without its ``hash`` and ``sig`` fields."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k not in ("hash", "sig")})).hexdigest()


def to_json(value, where: str = "value"):
    """Coerce ``value`` to plain JSON types (see the module docstring).

    Parameters
    ----------
    value
        A field value.
    where : str
        Its name, for the error message.

    Raises
    ------
    AuditError
        For a value with no JSON form (e.g. an arbitrary object).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = k if isinstance(k, str) else str(to_json(k, where))
            if key in out:
                raise AuditError(f"{where}: two keys become {key!r} as JSON; fix: use distinct string keys")
            out[key] = to_json(v, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [to_json(v, f"{where}[]") for v in value]
        return sorted(items, key=lambda v: canonical(v))
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays, torch tensors
        return to_json(value.tolist(), where)
    if hasattr(value, "item") and callable(value.item):
        return to_json(value.item(), where)
    raise AuditError(f"{where}: {type(value).__name__} value {value!r:.80} has no JSON form; fix: pass a number, "
                     "string, bool, None, list or dict (convert it with str() if needed)")


# --------------------------------------------------------------------------- keys


def load_private_key(path: str | os.PathLike) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key (OpenSSH ``node.key`` or PEM ``audit.key``).

    Raises
    ------
    AuditError
        Missing/unreadable file, encrypted key, not an EC key.
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise AuditError(f"audit signing key {p}: cannot read it ({exc.strerror}); fix: pass the node.key from "
                         "`fl-pki node-key` (or the coordinator's audit.key) and check its permissions") from None
    try:
        if raw.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(raw, password=None)
        else:
            key = serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        raise AuditError(f"audit signing key {p} is encrypted; fix: use an unencrypted key (node.key from "
                         "`fl-pki node-key` is)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AuditError(f"audit signing key {p} is not an OpenSSH or PEM private key ({exc}); fix: pass node.key "
                         "(not node.pub) or audit.key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuditError(f"audit signing key {p} is a {type(key).__name__}, not an EC key; fix: use an ECDSA key "
                         "(`fl-pki node-key` makes one)")
    return key


def load_public_key(path: str | os.PathLike) -> ec.EllipticCurvePublicKey:
    """Load an EC public key (OpenSSH ``node.pub`` line or PEM ``audit.pub``).

    Raises
    ------
    AuditError
        Missing/unreadable file, not a public key, not an EC key.
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise AuditError(f"public key {p}: cannot read it ({exc.strerror}); fix: pass the node.pub next to the "
                         "node's key (or the coordinator's audit.pub)") from None
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(raw)
        else:
            key = serialization.load_ssh_public_key(raw.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AuditError(f"public key {p} is not an OpenSSH or PEM public key ({exc}); fix: pass node.pub or "
                         "audit.pub, never a private key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AuditError(f"public key {p} is a {type(key).__name__}, not an EC key; fix: pass the ECDSA node.pub "
                         "or audit.pub")
    return key


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint (as ``ssh-keygen -lf`` and ``fl-pki show`` print it)."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def ensure_signing_key(key_path: str | os.PathLike, pub_path: str | os.PathLike | None = None) -> Path:
    """Create an EC P-256 audit key (PEM, mode 0600) and its public half unless they exist.

    Safe against concurrent callers: the key is written to a temporary file and linked into
    place (``os.link`` fails if another process got there first). The public key (PEM,
    0644, default ``<key without suffix>.pub``) is (re)written when missing.

    Parameters
    ----------
    key_path : path
        E.g. ``<state-dir>/audit.key``.
    pub_path : path, optional

    Returns
    -------
    Path
        ``key_path``.
    """
    key_path = Path(key_path).expanduser()
    pub = Path(pub_path).expanduser() if pub_path else key_path.with_suffix(".pub")
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        tmp = key_path.with_name(f".{key_path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, key_path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    if not pub.exists():
        data = load_private_key(key_path).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        tmp = pub.with_name(f".{pub.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, pub)
    return key_path


# --------------------------------------------------------------------------- the log


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + HEAD_SUFFIX)


def _tail(fd: int, size: int) -> tuple[bytes, bytes]:
    """``(last complete line without its newline, bytes after the last newline)`` of the file."""
    buf = b""
    pos = size
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        end = buf.rfind(b"\n")
        if end >= 0 and buf.rfind(b"\n", 0, end) >= 0:
            break
    end = buf.rfind(b"\n")
    if end < 0:
        return b"", buf
    start = buf.rfind(b"\n", 0, end) + 1
    return buf[start:end], buf[end + 1:]


class AuditLog:
    """An append-only, hash-chained (and, with a key, signed) JSON-lines audit log.

    Parameters
    ----------
    path : path
        The log file (created with mode 0600 on the first append).
    key_path : path, optional
        EC private key (OpenSSH ``node.key`` or PEM ``audit.key``) that signs every entry.
        Without it entries carry no ``sig``.

    Raises
    ------
    AuditError
        When the key cannot be loaded.
    """

    def __init__(self, path: str | os.PathLike, *, key_path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser()
        self.key_path = Path(key_path).expanduser() if key_path is not None else None
        self._key = load_private_key(self.key_path) if self.key_path is not None else None

    @property
    def head_path(self) -> Path:
        """The sidecar head file ``<log>.head``."""
        return _head_path(self.path)

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, signed={self._key is not None})"

    def _sign(self, digest_hex: str) -> str | None:
        if self._key is None:
            return None
        return base64.b64encode(self._key.sign(bytes.fromhex(digest_hex), ec.ECDSA(hashes.SHA256()))).decode("ascii")

    def _make(self, seq: int, prev: str, kind: str, data: dict) -> dict:
        entry = {"seq": seq, "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "kind": kind,
                 "data": data, "prev": prev}
        entry["hash"] = entry_hash(entry)
        sig = self._sign(entry["hash"])
        if sig is not None:
            entry["sig"] = sig
        return entry

    def check_appendable(self) -> None:
        """Refuse, as :meth:`append` would, a log that cannot take another entry; writes nothing.

        A node checks its log at start-up with it, so that a damaged log stops the node there
        (exit 2) rather than failing every task later.

        Raises
        ------
        AuditError
            Not a regular file, not writable by this account, an unreadable last entry, or a log
            shorter than (or different from) its head file; the message names the file and the fix.
        """
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise AuditError(f"audit log {self.path}: is not a file (a folder or another kind); fix: move it aside "
                             "(keep it: it may be evidence), so that the node starts a new log there")
        if not os.access(self.path, os.R_OK | os.W_OK):
            raise AuditError(f"audit log {self.path}: this account cannot read and write it; fix: run the node as the "
                             "log's owner, or `chmod 600` it")
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: cannot open it ({exc.strerror}); fix: check its permissions") from None
        try:
            self._chain_tip(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def _chain_tip(self, fd: int, size: int) -> tuple[dict | None, int, str, bytes]:
        """``(last entry or None, its seq, its hash, partial last line)``, checked against the head file.

        Raises
        ------
        AuditError
            An unreadable last entry, or a log shorter than (or different from) its head file.
        """
        last_line, partial = _tail(fd, size)
        last, seq, prev = None, 0, GENESIS
        if last_line:
            try:
                last = json.loads(last_line)
                seq, prev = int(last["seq"]), str(last["hash"])
            except (ValueError, KeyError, TypeError, RecursionError):
                raise AuditError(f"audit log {self.path}: the last entry is unreadable, so nothing can be chained to "
                                 "it; fix: run `audit verify` to find the damage, keep a copy of the file, then move "
                                 "it aside to start a new log") from None
        self._check_head(seq, prev)
        return last, seq, prev, partial

    def append(self, kind: str, **fields) -> dict:
        """Append one entry and return it (with ``seq``, ``time``, ``prev``, ``hash``, ``sig``).

        Parameters
        ----------
        kind : str
            What happened, e.g. ``"run"``, ``"register"``, ``"refused"``.
        **fields
            The entry's ``data``; values are coerced to JSON (``inf`` -> ``"inf"``, numpy
            -> numbers/lists). Use ``**{"run-id": ...}`` for keys that are not identifiers.

        Raises
        ------
        AuditError
            Bad ``kind`` or field value; unreadable last entry; a log shorter than (or
            different from) its head file (appending would hide the damage); I/O errors.
        """
        if not isinstance(kind, str) or not kind or len(kind) > 64:
            raise AuditError(f"{self.path}: kind {kind!r} is invalid; fix: pass a short non-empty string such as 'run'")
        data = to_json(fields, "fields")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: cannot open it for appending ({exc.strerror}); fix: check the "
                             "folder exists and is writable by this account") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            last, seq, prev, partial = self._chain_tip(fd, size)
            if size == 0 and not self.head_path.exists():
                # a new log: its genesis head first, so that a crash between the first entry and its head
                # reads as a head that lags (fine) and not as a missing head (tampering)
                self._write_head({"seq": 0, "hash": GENESIS})
            last_line = last is not None
            out = []
            if (last_line and self._key is not None and isinstance(last.get("sig"), str)
                    and not _signed_by(last, self._key.public_key())):
                # the signing key was replaced (a new node key after `fl-pki node-key --force`): a new key
                # segment, chained to the old entries, so that `verify` checks each segment with its key
                pub = self._key.public_key()
                rec = self._make(seq + 1, prev, KEY_CHANGED, {
                    "reason": f"entry seq {seq} is not signed by this key: the signing key was replaced",
                    "key": key_fingerprint(pub)})
                out.append(rec)
                seq, prev = rec["seq"], rec["hash"]
            if partial:
                # a write interrupted by a crash: drop the partial line, but keep the fact in the chain
                os.ftruncate(fd, size - len(partial))
                rec = self._make(seq + 1, prev, "recovered", {
                    "reason": "partial last line discarded (a write was interrupted)",
                    "discarded-bytes": len(partial), "discarded-sha256": hashlib.sha256(partial).hexdigest()})
                out.append(rec)
                seq, prev = rec["seq"], rec["hash"]
            entry = self._make(seq + 1, prev, kind, data)
            out.append(entry)
            payload = b"".join(canonical(e) + b"\n" for e in out)
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            os.fsync(fd)
            self._write_head(entry)
            return entry
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: write failed ({exc.strerror}); fix: check free disk space and "
                             "permissions") from None
        finally:
            os.close(fd)  # releases the lock

    def _check_head(self, seq: int, last_hash: str) -> None:
        head = _read_head(self.head_path)
        if head is None:
            return
        if head["seq"] > seq:
            what = f"ends at seq {seq} but its head file {self.head_path} records seq {head['seq']}: entries were removed"
        elif head["seq"] == seq and head["hash"] != last_hash:
            what = f"entry seq {seq} does not match its head file {self.head_path}: the entry was rewritten"
        else:
            return
        raise AuditError(f"audit log {self.path} {what}; appending is refused so the evidence stays. Fix: run "
                         "`audit verify`, keep copies of both files, then move them aside to start a new log")

    def _write_head(self, entry: dict) -> None:
        head = {"seq": entry["seq"], "hash": entry["hash"], "signature": entry.get("sig")}
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, canonical(head) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.head_path)
        fsync_dir(self.path.parent)

    def entries(self) -> list[dict]:
        """All complete entries, oldest first (a partial last line is skipped; [] if no file yet).

        Raises
        ------
        AuditError
            If a complete line is not JSON (run :func:`verify` for the details).
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: cannot read it ({exc.strerror}); fix: check its permissions") from None
        lines = raw.split(b"\n")[:-1]  # the last piece is "" or a partial line
        out = []
        for i, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
                raise AuditError(f"audit log {self.path}, line {i}: not a JSON entry; fix: run `audit verify` "
                                 "(the log was damaged or edited)") from None
            out.append(obj)
        return out


def _signed_by(entry: Mapping, pub) -> bool:
    """Whether ``entry`` carries a valid signature by ``pub`` (an unsigned entry: by no key)."""
    sig = entry.get("sig")
    if not isinstance(sig, str):
        return False
    try:
        der = base64.b64decode(sig, validate=True)
        if base64.b64encode(der).decode("ascii") != sig:  # unused base64 bits changed
            raise InvalidSignature
        pub.verify(der, bytes.fromhex(str(entry.get("hash"))), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _read_head(path: Path) -> dict | None:
    """The head file's content, None if absent; AuditError if unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"head file {path}: cannot read it ({exc.strerror}); fix: check its permissions") from None
    try:
        head = json.loads(raw)
        if not (isinstance(head, dict) and isinstance(head.get("seq"), int) and isinstance(head.get("hash"), str)):
            raise ValueError("missing seq/hash")
    except ValueError:
        raise AuditError(f"head file {path} is not a head record ({{\"seq\":..,\"hash\":..,\"signature\":..}}); fix: "
                         "pass the <log>.head file (or a copy of it)") from None
    return head


def audit_log_from_env() -> AuditLog | None:
    """The log named by ``$CITYFED_AUDIT_LOG`` (signed with ``$CITYFED_AUDIT_KEY`` if set), else None.

    ``fl-server start`` sets both for the SuperLink; its SuperExec and ServerApp
    processes inherit them (Flower 1.42 starts both with ``subprocess.Popen`` and the
    parent's environment). Simulations set neither, so they write nothing.
    """
    path = os.environ.get(ENV_LOG)
    if not path:
        return None
    key = os.environ.get(ENV_KEY) or None
    return AuditLog(path, key_path=key)


# --------------------------------------------------------------------------- verify


def _describe_seq_mismatch(lines: list[bytes], i: int, found) -> str:
    """Say whether entry ``i`` is gone or just elsewhere."""
    def seq_of(line: bytes):
        try:
            return json.loads(line).get("seq")
        except (ValueError, AttributeError):
            return None

    later = next((j for j in range(i, len(lines)) if seq_of(lines[j]) == i), None)
    if later is not None:
        return (f"line {i} holds entry seq {found} where seq {i} was expected; seq {i} appears later at line "
                f"{later + 1}: entries were reordered")
    if isinstance(found, int) and found > i:
        return f"entry seq {i} is missing (line {i} holds seq {found}): entries were deleted"
    return f"line {i} holds entry seq {found!r} where seq {i} was expected: an entry was inserted or duplicated"


def verify(path: str | os.PathLike, *, public_key_path=None,
           anchor: str | os.PathLike | None = None) -> VerifyResult:
    """Check a log's chain, signatures and head file; report the first broken entry.

    Parameters
    ----------
    path : path
        The log (its head file ``<log>.head`` is read too).
    public_key_path : path or list of paths, optional
        OpenSSH (``node.pub``) or PEM (``audit.pub``) public key(s): every entry must then
        carry a valid signature. A ``key-changed`` entry (the signing key was replaced)
        starts a key segment: every entry of a segment is signed by one key, the last
        segment's key must be given, and an earlier segment signed by a key not given is
        reported in ``unchecked`` (its entries are bound by the hash chain to the next
        segment's, signed by a given key). Without a key only the chain is checked (and the
        result says so).
    anchor : path, optional
        A head file copied off-host earlier: the log must still contain that entry.

    Returns
    -------
    VerifyResult

    Raises
    ------
    AuditError
        The log file (or key, or anchor) is missing or unreadable.
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise AuditError(f"audit log {p} does not exist; fix: pass the audit.jsonl in the node's or the "
                         "coordinator's state dir (--log)") from None
    except OSError as exc:
        raise AuditError(f"audit log {p}: cannot read it ({exc.strerror}); fix: check its permissions") from None
    if public_key_path is None:
        pubs = []
    elif isinstance(public_key_path, (str, os.PathLike)):
        pubs = [load_public_key(public_key_path)]
    else:
        pubs = [load_public_key(k) for k in public_key_path]
    pub = pubs[0] if pubs else None
    anchored = _read_head(Path(anchor).expanduser()) if anchor is not None else None
    if anchor is not None and anchored is None:
        raise AuditError(f"anchor {anchor} does not exist; fix: pass a copy of <log>.head taken earlier")
    checked = pub is not None
    segment = {"start": 1, "key": None}  # the current key segment: its first seq, the given key that signs it
    unchecked: list[tuple[int, int]] = []

    def bad(n_ok: int, seq: int | None, why: str) -> VerifyResult:
        return VerifyResult(False, n_ok, seq, why, checked)

    def signed_by_given(e: dict) -> int | None:
        return next((j for j, k in enumerate(pubs) if _signed_by(e, k)), None)

    def key_names() -> str:
        return " or ".join(key_fingerprint(k) for k in pubs)

    pieces = raw.split(b"\n")
    lines, rest = pieces[:-1], pieces[-1]
    entries: list[dict] = []
    prev = GENESIS
    for i, line in enumerate(lines, 1):
        try:
            e = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except (ValueError, UnicodeDecodeError) as exc:
            return bad(i - 1, i, f"entry seq {i} (line {i}) is not valid JSON ({str(exc)[:80]}): the line was edited or damaged")
        except RecursionError:
            return bad(i - 1, i, f"entry seq {i} (line {i}) is not valid JSON (nested too deeply): the line was edited "
                                 "or damaged")
        if not isinstance(e, dict):
            return bad(i - 1, i, f"entry seq {i} (line {i}) is not a JSON object: the line was edited")
        keys = set(e)
        if not _FIELDS <= keys or keys - _FIELDS - {"sig"}:
            missing, extra = sorted(_FIELDS - keys), sorted(keys - _FIELDS - {"sig"})
            return bad(i - 1, i, f"entry seq {i} (line {i}) has the wrong fields (missing {missing}, unexpected "
                                 f"{extra}): the line was edited")
        try:
            same = canonical(e) == line
        except ValueError:
            same = False
        if not same:
            return bad(i - 1, i, f"entry seq {i} (line {i}) was altered: its bytes are not the canonical form "
                                 "the log writes")
        if e["seq"] != i or isinstance(e["seq"], bool):
            if e["prev"] == prev:  # still linked to entry i-1: the seq field itself was changed
                return bad(i - 1, i, f"entry seq {i} (line {i}): its seq field reads {e['seq']!r}: the entry was edited")
            return bad(i - 1, i, _describe_seq_mismatch(lines, i, e["seq"]))
        if e["prev"] != prev:
            return bad(i - 1, i, f"entry seq {i}: its prev does not match the hash of entry seq {i - 1}: an entry "
                                 "before it was removed, inserted or rewritten")
        if entry_hash(e) != e["hash"]:
            return bad(i - 1, i, f"entry seq {i} ({e.get('kind')!r}): its content does not match its hash: the "
                                 "entry was edited")
        if pub is not None:
            sig = e.get("sig")
            if not isinstance(sig, str):
                return bad(i - 1, i, f"entry seq {i}: not signed, but a public key was given: the entry was "
                                     "written without the key or its signature was removed")
            if e["kind"] == KEY_CHANGED and i > 1:  # a new key segment starts here
                if segment["key"] is None:
                    unchecked.append((segment["start"], i - 1))
                segment.update(start=i, key=None)
            signer = signed_by_given(e)  # index into pubs, or None
            if i == segment["start"]:
                segment["key"] = signer
            elif signer != segment["key"]:  # one key signs every entry of a segment
                if segment["key"] is None:  # the segment's first entry is no given key's, this one is
                    return bad(segment["start"] - 1, segment["start"],
                               f"entry seq {segment['start']}: bad signature (not made by the key that signs entry "
                               f"seq {i} of the same key segment): the entry or its signature was replaced")
                return bad(i - 1, i, f"entry seq {i}: bad signature (not made by the key {key_names()} over "
                                     "this entry's hash): the entry or its signature was replaced")
        prev = e["hash"]
        entries.append(e)
    n = len(entries)
    if pub is not None and n and segment["key"] is None:  # the last segment must be a given key's
        start = segment["start"]
        return bad(start - 1, start, f"entry seq {start}: bad signature (not made by the key {key_names()} over this "
                                     "entry's hash): the entry or its signature was replaced")
    if rest:
        return bad(n, n + 1, f"entry seq {n + 1} (line {n + 1}) is incomplete ({len(rest)} bytes, no newline): a "
                             "write was interrupted or the file was cut mid-entry")
    try:
        head = _read_head(_head_path(p))
    except AuditError as exc:
        return bad(n, None, str(exc))
    if head is None:
        if n:
            return bad(n, None, f"head file {_head_path(p)} is missing: a cut tail could not be detected; fix: "
                                "restore it from a copy, or check against an anchor copied off-host")
    else:
        hs = head["seq"]
        if hs > n:
            return bad(n, n + 1, f"entry seq {n + 1} is missing: the log ends at seq {n} but its head file records "
                                 f"seq {hs}: the log was truncated ({hs - n} entr{'y' if hs - n == 1 else 'ies'} cut)")
        if hs >= 1 and (entries[hs - 1]["hash"] != head["hash"] or entries[hs - 1].get("sig") != head.get("signature")):
            return bad(n, hs, f"entry seq {hs} does not match the head file {_head_path(p)}: the entry (or the "
                              "head) was rewritten")
    if anchored is not None:
        a = anchored["seq"]
        if a > n:
            return bad(n, n + 1, f"entry seq {n + 1} is missing: the anchor {anchor} records seq {a} but the log ends "
                                 f"at seq {n}: the log was truncated")
        if a >= 1 and entries[a - 1]["hash"] != anchored["hash"]:
            return bad(n, a, f"entry seq {a} does not match the anchor {anchor}: the history was rewritten")
    notes = [f"{n} entr{'y' if n == 1 else 'ies'}, hash chain intact"]
    if checked and not unchecked:
        notes.append(f"every entry signed by {key_names()}")
    elif checked:
        ranges = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in unchecked)
        one = len(unchecked) == 1 and unchecked[0][0] == unchecked[0][1]
        notes.append(f"entr{'y' if one else 'ies'} {ranges} signed by an earlier key (the key was replaced at a key-changed entry): their "
                     f"signatures NOT checked, pass that key's public key too (--pub, repeatable); the other entries "
                     f"signed by {key_names()}")
    else:
        notes.append("signatures NOT checked (no public key given)")
    if head is not None and head["seq"] < n:
        notes.append(f"head file lags by {n - head['seq']} entr{'y' if n - head['seq'] == 1 else 'ies'} (an "
                     "interrupted append)")
    if anchored is not None:
        notes.append(f"contains the anchored entry seq {anchored['seq']}")
    return VerifyResult(True, n, None, "; ".join(notes), checked, tuple(unchecked))
