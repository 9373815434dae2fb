"""App pinning: a department node runs only app code its department approved.

A department node (``fl-client``) executes the ClientApp of each run's app bundle (FAB),
code that the coordinator ships. A hostile or compromised coordinator could ship a FAB
without the privacy-policy check, or one that reads the node's data file and sends it out.
Before a FAB is extracted, installed or any of its modules imported, :func:`admit_fab`
decides whether it may run. It is called from one place, :func:`clients.warm.run_task`,
which every ClientApp task of a node goes through (warm worker and ``fl-client --cold``).

Rules, in order:

1. **approved**: the FAB's sha256 (of its bytes; Flower's ``Fab.hash_str``) is listed in
   ``<state-dir>/apps/approved.json`` (``fl-client app approve``): it runs whatever it holds;
2. **release**: the FAB is the cityfed release installed on this node: its ``.py`` files are
   byte-identical to those of the release's packages (:data:`RELEASE_PACKAGES`: ``server``,
   ``clients``, ``citydata``, ``contract``, ``flower_compat``, ``privacy``, ``shared_models``,
   pyproject's ``fab-include``) in the node's own environment (located with importlib, never the
   working directory; :func:`release_manifest`), none missing and none extra; it holds no
   other file than ``pyproject.toml`` and Flower's ``.info/CONTENT`` (an ``.so``, a ``.pyc``
   or a ``.pth`` could take over imports even when every ``.py`` matches); and its
   ``[tool.flwr.app.components]`` are the release's (:data:`COMPONENTS`);
3. anything else is **refused**: the task's reply is an error (code :data:`APP_REFUSED`)
   whose reason names the FAB's sha256 and the differing files, the FAB's bytes are kept in
   ``<state-dir>/apps/quarantine/<sha256>.fab`` with ``index.json`` mapping run IDs to it
   (``fl-client app review``), and the node's audit log gets an ``app-refused`` entry.

The FAB is read in memory (``zipfile`` on its bytes); a refused FAB is never extracted.
Decisions are recorded in the node's audit log (``<state-dir>/audit.jsonl``, signed with
the node key from ``$CITYFED_NODE_KEY``) when :mod:`privacy.audit` is available.
"""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import getpass
import hashlib
import io
import json
import os
import shlex
import stat
import sys
import threading
import tomllib
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from contract.files import write_atomic
from contract.text_files import load_toml

#: Packages of the cityfed release that a FAB ships (pyproject ``fab-include``).
RELEASE_PACKAGES = ("server", "clients", "citydata", "contract", "flower_compat", "privacy", "shared_models")
#: The release's ``[tool.flwr.app.components]``.
COMPONENTS = {"serverapp": "server.app:app", "clientapp": "clients.app:app"}
#: Flower's own FAB metadata (verified and removed by Flower's FAB installer, never importable).
FAB_METADATA = (".info/CONTENT",)
PYPROJECT = "pyproject.toml"
#: Error code of the reply to a task whose FAB this node refused.
APP_REFUSED = 4033
#: Environment (set by ``fl-client``): the node's state dir, and its private key (signs audit entries).
HOME_ENV, KEY_ENV = "CITYFED_NODE_HOME", "CITYFED_NODE_KEY"
#: Limits on what is read from a FAB (Flower caps a FAB at 10 MB compressed).
MAX_FILE_BYTES, MAX_TOTAL_BYTES = 16 * 2**20, 64 * 2**20
#: Refused FABs kept for review; beyond this, the oldest are deleted (their index entries stay).
MAX_QUARANTINED = 100
#: Files Flower's FAB builder never ships (Flower's FAB exclude patterns).
_NEVER_SHIPPED = ("test_*.py", "*_test.py")


class PinningError(Exception):
    """A problem an operator must fix (message names the file/value and the fix)."""


@dataclass(frozen=True)
class Finding:
    """One way a FAB differs from what the node accepts: ``path`` (in the FAB), ``status``, ``detail``."""

    path: str
    status: str
    detail: str = ""

    def label(self) -> str:
        return f"{self.path} ({self.status})"


@dataclass(frozen=True)
class Verdict:
    """What :func:`check_fab` decided about one FAB."""

    sha256: str
    accepted: bool
    rule: str  # "approved" | "release" | "" (refused)
    findings: tuple[Finding, ...] = ()
    home: str | None = None  # the node's state dir (set by admit_fab; named in the node's own log only)

    def reason(self, limit: int = 12, *, local: bool = False) -> str:
        """One line for the task's error reply (``local=False``) and the node's log (``local=True``).

        The node's log line gives the review and approve commands with ``--state-dir`` (the
        node's own folder, which the reply to the coordinator does not name).
        """
        if self.accepted:
            return f"app accepted by this department: FAB sha256 {self.sha256} ({self.rule})"
        where = f" --state-dir {shlex.quote(self.home)}" if local and self.home else ""
        hint = (f"review with `fl-client app review {self.sha256[:12]}{where}`, approve with "
                f"`fl-client app approve {self.sha256}{where}`")
        if self.findings and self.findings[0].status == "hash mismatch":
            return (f"app not approved by this department: the coordinator announced the FAB as sha256 "
                    f"{self.findings[0].detail.split()[-1]} but its bytes hash to {self.sha256}; {hint}")
        listed = ", ".join(f.label() for f in self.findings[:limit])
        if len(self.findings) > limit:
            listed += f", and {len(self.findings) - limit} more"
        return (f"app not approved by this department: FAB sha256 {self.sha256} differs from the installed cityfed "
                f"release: {listed}; {hint}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the installed release


def _find_installed(name: str):
    """``name``'s import spec as the node's environment resolves it, ignoring the working directory."""
    from importlib.machinery import PathFinder

    cwd = Path.cwd().resolve()

    def outside_cwd(entry: str) -> bool:
        try:
            return bool(entry) and Path(entry).resolve() != cwd
        except OSError:
            return False

    path = [p for p in sys.path if outside_cwd(p)]
    for finder in sys.meta_path:
        if finder is PathFinder:
            spec = PathFinder.find_spec(name, path)
        else:
            find = getattr(finder, "find_spec", None)
            spec = find(name, None) if find is not None else None
        if spec is not None:
            return spec
    return None


_dirs_lock = threading.Lock()
_release_dirs: dict[str, Path] | None = None


def release_dirs() -> dict[str, Path]:
    """Folders of the release packages installed in this environment (located once per process).

    Raises
    ------
    PinningError
        A package is not installed (the node then refuses every FAB it has not approved).
    """
    global _release_dirs
    with _dirs_lock:
        if _release_dirs is None:
            found = {}
            for name in RELEASE_PACKAGES:
                spec = _find_installed(name)
                locations = list(spec.submodule_search_locations or []) if spec is not None else []
                if not locations:
                    raise PinningError(f"cityfed package {name!r} is not installed in {sys.prefix} ({sys.executable}); "
                                       "fix: install cityfed on this node (`make install`)")
                found[name] = Path(locations[0]).resolve()
            _release_dirs = found
        return dict(_release_dirs)


def _never_shipped(filename: str) -> bool:
    from fnmatch import fnmatchcase

    return any(fnmatchcase(filename, pattern) for pattern in _NEVER_SHIPPED)


def release_files() -> dict[str, Path]:
    """``{relpath: file}`` of every ``.py`` file a FAB of the installed release carries.

    ``relpath`` as in a FAB (``clients/node.py``). Skipped as Flower's FAB builder skips them:
    ``__pycache__``, symbolic links, ``test_*.py`` and ``*_test.py``.
    """
    out = {}
    for name, folder in release_dirs().items():
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for filename in filenames:
                path = Path(dirpath) / filename
                if not filename.endswith(".py") or _never_shipped(filename) or path.is_symlink():
                    continue
                out[f"{name}/{path.relative_to(folder).as_posix()}"] = path
    return out


_manifest_lock = threading.Lock()
_manifest_cache: tuple[tuple, dict[str, str]] | None = None


def release_manifest() -> dict[str, str]:
    """``{relpath: sha256}`` of the installed release's ``.py`` files.

    Cached: files are hashed again only when a file's size, modification time or inode
    changed, or files were added or removed (a few ``stat`` calls per task).
    """
    global _manifest_cache
    files = release_files()
    signature = []
    for rel, path in sorted(files.items()):
        st = path.stat()
        signature.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    key = tuple(signature)
    with _manifest_lock:
        if _manifest_cache is None or _manifest_cache[0] != key:
            _manifest_cache = (key, {rel: sha256(path.read_bytes()) for rel, path in sorted(files.items())})
        return dict(_manifest_cache[1])


def manifest_hash(manifest: dict[str, str]) -> str:
    """One sha256 naming a manifest (``fl-client app list``)."""
    return sha256("".join(f"{rel} {digest}\n" for rel, digest in sorted(manifest.items())).encode())


# --------------------------------------------------------------------------- reading a FAB


def _unsafe(info: zipfile.ZipInfo) -> str:
    name = info.filename
    if name.endswith("/"):
        return "directory entry"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    if name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in name.split("/")):
        return "path outside the app folder"
    return ""


def read_fab(content: bytes) -> tuple[dict[str, bytes], list[Finding]]:
    """The files of a FAB, read in memory (nothing is written to disk).

    Returns
    -------
    files : dict
        ``{path in the FAB: bytes}``.
    findings : list of Finding
        Entries that cannot be installed safely (unsafe path, duplicate, too large,
        unreadable), or the archive itself (path ``<FAB>``) when it is not a zip file.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, ValueError) as exc:
        return {}, [Finding("<FAB>", "not a zip archive", str(exc))]
    files: dict[str, bytes] = {}
    findings: list[Finding] = []
    total = 0
    with archive:
        for info in archive.infolist():
            name = info.filename
            why = _unsafe(info)
            if why:
                findings.append(Finding(name, "unsafe", why))
                continue
            if name in files:
                findings.append(Finding(name, "duplicate", "listed twice in the archive"))
                continue
            if info.file_size > MAX_FILE_BYTES or total + info.file_size > MAX_TOTAL_BYTES:
                findings.append(Finding(name, "too large", f"{info.file_size} bytes"))
                continue
            try:
                with archive.open(info) as fh:
                    data = fh.read(MAX_FILE_BYTES + 1)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error) as exc:
                findings.append(Finding(name, "unreadable", str(exc)))
                continue
            if len(data) > MAX_FILE_BYTES:
                findings.append(Finding(name, "too large", f"more than {MAX_FILE_BYTES} bytes"))
                continue
            total += len(data)
            files[name] = data
    return files, findings


def _kind(name: str) -> str:
    suffix = Path(name).suffix.lower()
    known = {".so": "compiled extension: imported before a .py of the same name", ".pyd": "compiled extension",
             ".pyc": "bytecode: can replace a .py", ".pth": "site path hook: runs code at start-up",
             ".whl": "package", ".egg": "package", ".zip": "archive (importable)"}
    if name.startswith(".info/"):
        return "not Flower's FAB metadata"
    return known.get(suffix, "only .py files, pyproject.toml and .info/CONTENT may be in the app")


def _check_pyproject(data: bytes) -> list[Finding]:
    try:
        config = load_toml(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [Finding(PYPROJECT, "invalid", f"not valid TOML: {exc}")]
    components = config
    for key in ("tool", "flwr", "app", "components"):
        components = components.get(key) if isinstance(components, dict) else None
    if components != COMPONENTS:
        shown = ", ".join(f"{k} = {v!r}" for k, v in components.items()) if isinstance(components, dict) else repr(components)
        want = ", ".join(f"{k} = {v!r}" for k, v in COMPONENTS.items())
        return [Finding(PYPROJECT, "components changed", f"[tool.flwr.app.components] {shown}; the release has {want}")]
    return []


def compare(files: dict[str, bytes], manifest: dict[str, str]) -> list[Finding]:
    """How a FAB's files differ from the release ``manifest`` (empty: identical)."""
    findings = []
    for name in sorted(files):
        if name in FAB_METADATA:
            continue
        if name == PYPROJECT:
            findings += _check_pyproject(files[name])
        elif not name.endswith(".py"):
            findings.append(Finding(name, "not allowed", _kind(name)))
        elif name not in manifest:
            findings.append(Finding(name, "extra", "not in the installed release"))
        elif sha256(files[name]) != manifest[name]:
            findings.append(Finding(name, "modified", "differs from the installed release"))
    findings += [Finding(name, "missing", "in the installed release, not in the FAB")
                 for name in sorted(set(manifest) - set(files))]
    if PYPROJECT not in files:
        findings.append(Finding(PYPROJECT, "missing", "every FAB has one"))
    return findings


def check_fab(content: bytes, manifest: dict[str, str] | None, approved: set[str] | dict,
              announced: str | None = None) -> Verdict:
    """Decide about one FAB from its bytes alone (no side effects; see the module docstring).

    Parameters
    ----------
    content : bytes
        The FAB as received.
    manifest : dict or None
        :func:`release_manifest`; None when the release could not be located (then only an
        approved FAB runs).
    approved : set or dict
        Approved sha256 values (keys of ``approved.json``'s ``approved``).
    announced : str, optional
        The hash the coordinator announced for this FAB (``Fab.hash_str``): Flower installs
        and loads by it, so it must be the content's.
    """
    digest = sha256(content)
    if announced is not None and announced != digest:
        return Verdict(digest, False, "", (Finding("<FAB>", "hash mismatch", f"announced as {announced}"),))
    if digest in approved:
        return Verdict(digest, True, "approved")
    files, findings = read_fab(content)
    if manifest is None:
        findings.append(Finding("<release>", "not found", "the installed cityfed release could not be located"))
    elif files or not findings:
        findings += compare(files, manifest)
    return Verdict(digest, not findings, "" if findings else "release", tuple(findings))


def installed_mismatch(app_dir: Path, content: bytes) -> list[str]:
    """Files of an installed app folder that are not exactly the FAB's (``__pycache__`` aside).

    Flower installs a FAB into ``apps/<publisher>.<name>.<version>.<first 8 hex of its hash>``
    and reuses that folder if it exists: a folder left by another FAB with the same prefix
    would be loaded instead. The caller reinstalls when this is not empty.
    """
    files, _ = read_fab(content)
    want = {name: sha256(data) for name, data in files.items() if not name.startswith(".info/")}
    app_dir = Path(app_dir)
    have = {}
    for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for filename in filenames:
            path = Path(dirpath) / filename
            have[path.relative_to(app_dir).as_posix()] = "link" if path.is_symlink() else sha256(path.read_bytes())
    return sorted(name for name in set(want) | set(have) if want.get(name) != have.get(name))


# --------------------------------------------------------------------------- node state


def node_home() -> Path:
    """The node's state dir: ``$CITYFED_NODE_HOME`` (set by ``fl-client``), else ``$FLWR_HOME``, else ``~/.flwr``."""
    raw = os.environ.get(HOME_ENV) or os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    return Path(raw).expanduser().resolve()


def apps_dir(home: Path) -> Path:
    return Path(home) / "apps"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically and durably (:func:`contract.files.write_atomic`, folder fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), durable_dir=True)


class _Locked:
    """An exclusive ``flock`` on ``<file>.lock`` for a read-modify-write of ``file``."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fh = open(self.path, "a")  # noqa: SIM115 - closed in __exit__
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.fh.close()


class Approvals:
    """The department's approved FAB hashes: ``<state-dir>/apps/approved.json``.

    ``{"approved": {sha256: {"approved-at", "by"}}, "revoked": {sha256: {"revoked-at", "by"}}}``,
    written atomically.
    """

    def __init__(self, home: Path):
        self.path = apps_dir(home) / "approved.json"

    def load(self) -> dict:
        """The file's content (empty lists when it does not exist).

        Raises
        ------
        PinningError
            The file is unreadable or not this format (names the file and the fix).
        """
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"approved": {}, "revoked": {}}
        except (OSError, ValueError) as exc:
            raise PinningError(f"{self.path}: cannot read the approved apps ({exc}); fix: restore it from a backup, "
                               "or move it aside and approve the apps again with `fl-client app approve`") from None
        if not isinstance(data, dict) or not isinstance(data.get("approved", {}), dict):
            raise PinningError(f"{self.path}: not an approved-apps file (no 'approved' table); fix: restore it from "
                               "a backup, or move it aside and approve the apps again")
        data.setdefault("approved", {})
        data.setdefault("revoked", {})
        return data

    def approved(self) -> dict[str, dict]:
        return self.load()["approved"]

    def approve(self, digest: str, **info) -> bool:
        """Approve ``digest``; False if it already was."""
        with _Locked(self.path):
            data = self.load()
            if digest in data["approved"]:
                return False
            data["approved"][digest] = {"approved-at": _now(), "by": _user(), **info}
            data["revoked"].pop(digest, None)
            write_json(self.path, data)
        return True

    def revoke(self, digest: str) -> bool:
        """Withdraw the approval of ``digest``; False if it was not approved."""
        with _Locked(self.path):
            data = self.load()
            if data["approved"].pop(digest, None) is None:
                return False
            data["revoked"][digest] = {"revoked-at": _now(), "by": _user()}
            write_json(self.path, data)
        return True


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (containers): not worth failing an approval
        return str(os.getuid())


class Quarantine:
    """Refused FABs kept for review: ``<state-dir>/apps/quarantine/<sha256>.fab`` and ``index.json``.

    ``index.json``: ``{"runs": {run_id: {"sha256", "refused-at", "files": ["path (status)", ...]}}}``.
    """

    def __init__(self, home: Path):
        self.dir = apps_dir(home) / "quarantine"
        self.index_path = self.dir / "index.json"

    def fab_path(self, digest: str) -> Path:
        return self.dir / f"{digest}.fab"

    def index(self) -> dict:
        try:
            data = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            data = {}
        runs = data.get("runs") if isinstance(data, dict) else None
        return {"runs": runs if isinstance(runs, dict) else {}}

    def keep(self, content: bytes, verdict: Verdict, run_id) -> bool:
        """Store the FAB (once) and index ``run_id``; True if this run was not indexed with it yet."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.fab_path(verdict.sha256)
        if not target.exists():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, target)
            self._trim()
        if run_id is None:
            return True
        with _Locked(self.index_path):
            data = self.index()
            key = str(run_id)
            if data["runs"].get(key, {}).get("sha256") == verdict.sha256:
                return False
            data["runs"][key] = {"sha256": verdict.sha256, "refused-at": _now(),
                                 "files": [f.label() for f in verdict.findings]}
            write_json(self.index_path, data)
        return True

    def _trim(self) -> None:
        """Keep the newest :data:`MAX_QUARANTINED` FABs (a coordinator cannot fill the node's disk)."""
        kept = sorted(self.dir.glob("*.fab"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[MAX_QUARANTINED:]:
            old.unlink(missing_ok=True)

    def fabs(self) -> list[str]:
        """sha256 of every quarantined FAB."""
        return sorted(p.stem for p in self.dir.glob("*.fab")) if self.dir.is_dir() else []

    def runs_of(self, digest: str) -> list[str]:
        return sorted(r for r, e in self.index()["runs"].items() if e.get("sha256") == digest)


def is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def resolve_fab(ref: str, home: Path) -> tuple[str, bytes | None, str]:
    """Find the FAB an operator means: a ``.fab`` file, a (prefix of a) quarantined sha256, or a run ID.

    Returns
    -------
    tuple
        ``(sha256, bytes or None when not kept, where it was found)``.

    Raises
    ------
    PinningError
        Nothing matches, or a prefix matches several quarantined FABs.
    """
    q = Quarantine(home)
    path = Path(ref).expanduser()
    if path.is_file():
        content = path.read_bytes()
        return sha256(content), content, str(path)
    runs = q.index()["runs"]
    if ref in runs:
        digest = runs[ref]["sha256"]
        fab = q.fab_path(digest)
        return digest, fab.read_bytes() if fab.is_file() else None, f"run {ref} (quarantine {fab})"
    low = ref.lower()
    if len(low) >= 4 and all(c in "0123456789abcdef" for c in low):
        matches = [d for d in q.fabs() if d.startswith(low)]
        if len(matches) == 1:
            fab = q.fab_path(matches[0])
            return matches[0], fab.read_bytes(), f"quarantine {fab}"
        if len(matches) > 1:
            raise PinningError(f"{ref!r} matches {len(matches)} quarantined FABs ({', '.join(m[:16] for m in matches)}); "
                               "fix: give more characters of the sha256")
        if is_sha256(low):
            return low, None, "not kept on this node"
    raise PinningError(f"{ref!r} is not a .fab file, nor the sha256 (or a prefix) of a FAB in {q.dir}, nor a run ID in "
                       f"{q.index_path}; fix: pass one of those (`fl-client app list` shows them), or check --state-dir")


def full_sha256(ref: str, home: Path) -> str:
    """``ref`` as a full sha256: itself, or the one quarantined FAB whose hash starts with it.

    Raises
    ------
    PinningError
        Not hex, or a prefix that matches no (or several) quarantined FABs.
    """
    low = ref.strip().lower()
    if is_sha256(low):
        return low
    if len(low) >= 4 and all(c in "0123456789abcdef" for c in low):
        matches = [d for d in Quarantine(home).fabs() if d.startswith(low)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise PinningError(f"{ref!r} matches {len(matches)} quarantined FABs; fix: give the full sha256")
    raise PinningError(f"{ref!r} is not a sha256; fix: give the FAB's full sha256 (64 hex characters, as in the "
                       "refusal message), or a prefix of a quarantined FAB's (`fl-client app list`)")


# --------------------------------------------------------------------------- audit


_audit_lock = threading.Lock()
_audit_class = None
_audit_failure: str | None = None
_notes: set[str] = set()


def _note(text: str) -> None:
    """Print ``text`` to stderr once per process."""
    if text not in _notes:
        _notes.add(text)
        print(f"cityfed: {text}", file=sys.stderr, flush=True)


def audit_class():
    """:class:`privacy.audit.AuditLog` of the installed release, imported once (None if unavailable).

    Imported by :func:`prepare` before any FAB is loaded: later imports of ``privacy`` in a
    warm worker could resolve to an (accepted) FAB's copy.
    """
    global _audit_class, _audit_failure
    with _audit_lock:
        if _audit_class is None and _audit_failure is None:
            try:
                from privacy.audit import AuditLog

                _audit_class = AuditLog
            except Exception as exc:  # noqa: BLE001 - the audit module is optional for the decision itself
                _audit_failure = f"{type(exc).__name__}: {exc}"
        return _audit_class


def audit(home: Path, kind: str, key_path: str | os.PathLike | None = None, strict: bool = False,
          **fields) -> bool:
    """Append one entry to the node's audit log (``<home>/audit.jsonl``).

    Parameters
    ----------
    home : Path
        The node's state folder.
    kind : str
        The entry's kind (``app-approved``, ...).
    key_path : path, optional
        The node key that signs the entry (default ``$CITYFED_NODE_KEY``; unsigned without one).
    strict : bool
        Raise :class:`PinningError` naming the reason when the entry cannot be written, instead of
        a note and False. The node's own decisions (a task refused or run) use False: a full disk
        must not crash the node; an operator's ``fl-client app`` decision uses True.
    **fields
        The entry's fields.

    Returns
    -------
    bool
        True when the entry was appended; False (and a note) when it could not be.
    """
    cls = audit_class()
    if cls is None:
        reason = f"privacy.audit is not available ({_audit_failure})"
        if strict:
            raise PinningError(f"audit entry {kind!r} not written: {reason}")
        _note(f"audit entries not written ({kind}): {reason}")
        return False
    key = key_path or os.environ.get(KEY_ENV) or None
    if key is None:
        _note(f"audit entries are not signed: no node key (${KEY_ENV} unset; fl-client sets it)")
    try:
        cls(Path(home) / "audit.jsonl", key_path=key).append(kind, **fields)
        return True
    except Exception as exc:  # noqa: BLE001 - a full disk must not crash the node's decision
        if strict:
            raise PinningError(f"audit entry {kind!r} not written: {exc}") from None
        _note(f"audit entry {kind!r} not written: {exc}")
        return False


def prepare() -> None:
    """Locate the release, hash it and import the audit log class now (before any FAB is loaded)."""
    try:
        release_manifest()
    except PinningError as exc:
        _note(str(exc))
    audit_class()


# --------------------------------------------------------------------------- the decision


_accepted_seen: set[tuple] = set()


def admit_fab(content: bytes, *, announced: str | None = None, run_id=None, home: Path | None = None) -> Verdict:
    """Decide whether this node may install and run a FAB, and record the decision.

    The one check of a node's app code: called by :func:`clients.warm.run_task` before the
    FAB is installed or any of its modules imported. A refused FAB is quarantined (with the
    run ID in the index) and an ``app-refused`` audit entry written once per run and FAB;
    an accepted one gets an ``app-accepted`` entry once per run, FAB and rule (per process).
    Recording failures (disk full) are noted on stderr and do not change the decision.

    Parameters
    ----------
    content : bytes
        The FAB's bytes (``Fab.content``).
    announced : str, optional
        ``Fab.hash_str`` as the coordinator sent it.
    run_id : int or str, optional
        Flower run ID (for the quarantine index and the audit log).
    home : Path, optional
        The node's state dir (default :func:`node_home`).
    """
    home = Path(home) if home is not None else node_home()
    try:
        approved = Approvals(home).approved()
    except PinningError as exc:
        _note(f"{exc} (only the installed release is accepted meanwhile)")
        approved = {}
    try:
        manifest = release_manifest()
    except PinningError as exc:
        _note(str(exc))
        manifest = None
    try:
        verdict = check_fab(content, manifest, approved, announced)
    except Exception as exc:  # noqa: BLE001 - a check that fails refuses, and the FAB is still kept and audited
        verdict = Verdict(sha256(content), False, "",
                          (Finding("<FAB>", "check failed", f"the node's check raised {type(exc).__name__}"),))
    verdict = dataclasses.replace(verdict, home=str(home))
    run = None if run_id is None else str(run_id)
    if verdict.accepted:
        seen = (run, verdict.sha256, verdict.rule)
        if seen not in _accepted_seen:
            _accepted_seen.add(seen)
            audit(home, "app-accepted", **{"run-id": run, "fab-sha256": verdict.sha256, "rule": verdict.rule})
        return verdict
    try:
        new = Quarantine(home).keep(content, verdict, run)
    except OSError as exc:
        _note(f"refused FAB {verdict.sha256} not quarantined under {apps_dir(home)}: {exc}")
        new = True
    if new:
        audit(home, "app-refused", **{"run-id": run, "fab-sha256": verdict.sha256,
                                       "files": [{"path": f.path, "status": f.status} for f in verdict.findings]})
    return verdict


# --------------------------------------------------------------------------- review


def file_diff(name: str, fab_bytes: bytes | None, release: Path | None, context: int = 3) -> str:
    """Unified diff of one file: installed release (``a/``) -> FAB (``b/``); empty when equal."""

    def lines(data: bytes | None) -> list[str]:
        if data is None:
            return []
        return data.decode("utf-8", "replace").splitlines(keepends=True)

    old = release.read_bytes() if release is not None and release.is_file() else None
    diff = difflib.unified_diff(lines(old), lines(fab_bytes), f"a/{name}" if old is not None else "/dev/null",
                                f"b/{name}" if fab_bytes is not None else "/dev/null", n=context)
    return "".join(line if line.endswith("\n") else line + "\n" for line in diff)
