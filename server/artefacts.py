"""Run artefacts without pickle: model weights and coordinator checkpoints in safetensors + JSON.

A run folder holds ``model.safetensors`` (the final global model: one tensor per
``state_dict`` entry) and, while a run goes on, ``checkpoint.safetensors``. Neither can
execute code when read: safetensors holds only raw arrays, and everything else (history,
strategy state, run ID, round) is JSON.

A checkpoint is **one file** so that it is replaced atomically (temporary file, fsync,
rename): its tensors are the global model (``arrays/<name>``) and any numpy arrays found
in the checkpoint blob's other parts (``state/<n>``, e.g. FedAdam's ``m_t`` / ``v_t``
moments), and its safetensors header metadata ``cityfed-checkpoint`` is the JSON of
the rest of the blob, with each array replaced by ``{"$array": "state/<n>"}``. Any
JSON-able key a strategy adds to ``strategy_state()`` (e.g. ``"central_dp"``) is stored
as it is. Dicts with non-string keys (node IDs) and tuples are tagged so that they come
back as they went in.

A ``checkpoint.pkl`` written by an earlier cityfed is never unpickled:
:func:`require_no_legacy_checkpoint` stops with :class:`LegacyCheckpointError`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from contract.files import write_atomic  # noqa: F401  (re-exported: server.artefacts.write_atomic)

#: Checkpoint file in a run folder (written after every round).
CHECKPOINT = "checkpoint.safetensors"
#: The pickle checkpoint of earlier versions (refused, never read).
LEGACY_CHECKPOINT = "checkpoint.pkl"
#: The final model of a run.
MODEL = "model.safetensors"
#: The pickle model file of earlier versions (never read).
LEGACY_MODEL = "model.pt"
#: Safetensors metadata key holding a checkpoint's JSON part.
_META_KEY = "cityfed-checkpoint"
#: Format version of the checkpoint's JSON part.
CHECKPOINT_FORMAT = 1


class ArtefactError(ValueError):
    """A run artefact (checkpoint, model file) that cannot be read or written; the message names the file and the fix."""


class LegacyCheckpointError(ArtefactError):
    """A run folder holds only a pickle checkpoint of an earlier cityfed version."""


def _contiguous(arrays: dict) -> dict[str, np.ndarray]:
    out = {}
    for k, v in arrays.items():
        a = np.ascontiguousarray(np.asarray(v))
        if a.dtype == object:
            raise ArtefactError(f"array {k!r} has dtype object, which safetensors cannot store")
        out[str(k)] = a
    return out


def save_model(path: Path, arrays: dict, metadata: dict[str, str] | None = None) -> None:
    """Write model weights (``name -> array or tensor``) to a safetensors file, atomically.

    Parameters
    ----------
    path : Path
        Usually ``<run-dir>/model.safetensors``.
    arrays : dict
        ``state_dict``-style mapping; torch tensors and numpy arrays are both accepted.
    metadata : dict of str to str, optional
        Safetensors header metadata (e.g. the run ID).
    """
    from safetensors.numpy import save

    np_arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in arrays.items()}
    write_atomic(Path(path), save(_contiguous(np_arrays), metadata=metadata))


def load_model(path: Path) -> dict[str, np.ndarray]:
    """Read model weights written by :func:`save_model` (``name -> numpy array``).

    Parameters
    ----------
    path : Path

    Returns
    -------
    dict of str to numpy.ndarray

    Raises
    ------
    ArtefactError
        The file is missing or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path}: no such model file (a run writes {MODEL} when it ends)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtefactError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__}); make it readable by "
                            "this user") from None
    return model_from_bytes(data, path)


def model_from_bytes(data: bytes, where: Path) -> dict[str, np.ndarray]:
    """Model weights from the bytes of a safetensors file (``name -> numpy array``).

    Parameters
    ----------
    data : bytes
        The file's bytes, as read (and, for a package, as hashed).
    where : Path
        The file they came from, named in errors.

    Raises
    ------
    ArtefactError
        Not a safetensors file.
    """
    from safetensors.numpy import load

    try:
        return dict(load(bytes(data)))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtefactError(f"{where}: not a readable safetensors file ({type(exc).__name__}); "
                            "write it again (fl-sim run / fl-server run) or restore it from a copy") from None


# -- checkpoint blob <-> (JSON, arrays) ---------------------------------------------------
def _encode(obj, arrays: dict[str, np.ndarray], where: str):
    if isinstance(obj, np.ndarray):
        key = f"state/{len(arrays)}"
        arrays[key] = obj
        return {"$array": key}
    from flwr.app import ArrayRecord

    if isinstance(obj, ArrayRecord):
        return {"$arrayrecord": {k: _encode(v.numpy(), arrays, f"{where}.{k}") for k, v in obj.items()}}
    if hasattr(obj, "detach"):  # torch tensor
        return _encode(obj.detach().cpu().numpy(), arrays, where)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("$") for k in obj):
            return {k: _encode(v, arrays, f"{where}.{k}") for k, v in obj.items()}
        return {"$items": [[_encode(k, arrays, f"{where} key"), _encode(v, arrays, f"{where}[{k!r}]")]
                           for k, v in obj.items()]}
    raise ArtefactError(f"checkpoint: {where} is a {type(obj).__name__}, which a checkpoint cannot store "
                        "(JSON values, numpy arrays and tensors only); convert it in strategy_state()")


def _decode(obj, arrays: dict[str, np.ndarray]):
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"$array"}:
            return arrays[obj["$array"]]
        if set(obj) == {"$arrayrecord"}:
            from flwr.app import Array, ArrayRecord

            return ArrayRecord({k: Array(np.ascontiguousarray(_decode(v, arrays))) for k, v in obj["$arrayrecord"].items()})
        if set(obj) == {"$tuple"}:
            return tuple(_decode(v, arrays) for v in obj["$tuple"])
        if set(obj) == {"$items"}:
            return {_decode(k, arrays): _decode(v, arrays) for k, v in obj["$items"]}
        return {k: _decode(v, arrays) for k, v in obj.items()}
    return obj


def checkpoint_bytes(blob: dict) -> bytes:
    """Serialise a checkpoint blob (``arrays``: the global model; any other JSON-able parts) to safetensors bytes.

    Parameters
    ----------
    blob : dict
        ``run_id``, ``round``, ``arrays`` (name -> numpy array), ``strategy_state``,
        ``history`` and whatever else a strategy saves.

    Returns
    -------
    bytes
    """
    from safetensors.numpy import save

    tensors = {f"arrays/{k}": v for k, v in (blob.get("arrays") or {}).items()}
    state: dict[str, np.ndarray] = {}
    rest = {k: v for k, v in blob.items() if k != "arrays"}
    meta = {"format": CHECKPOINT_FORMAT, "array-names": list((blob.get("arrays") or {}).keys()),
            "blob": _encode(rest, state, "checkpoint")}
    tensors.update(state)
    return save(_contiguous(tensors), metadata={_META_KEY: json.dumps(meta, allow_nan=True)})


def write_checkpoint(path: Path, blob: dict) -> None:
    """Write a coordinator checkpoint atomically (see the module docstring for the layout).

    Parameters
    ----------
    path : Path
        Usually ``<run-dir>/checkpoint.safetensors``.
    blob : dict
        As for :func:`checkpoint_bytes`.
    """
    write_atomic(Path(path), checkpoint_bytes(blob))


def read_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`write_checkpoint`: the blob as it was saved.

    Parameters
    ----------
    path : Path

    Returns
    -------
    dict
        ``arrays`` (name -> numpy array, in the saved order) and the blob's other parts.

    Raises
    ------
    LegacyCheckpointError
        ``path`` is a pickle checkpoint of an earlier version (it is not opened as pickle).
    ArtefactError
        Missing, damaged or not a cityfed checkpoint.
    """
    from safetensors import safe_open

    from privacy.policy import shown_value

    path = Path(path)
    if path.suffix == ".pkl":
        raise LegacyCheckpointError(legacy_message(path))
    if not path.is_file():
        raise ArtefactError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = (fh.metadata() or {}).get(_META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types
        raise ArtefactError(f"{path}: damaged checkpoint, not readable as safetensors ({type(exc).__name__}); "
                            "start a new run (or restore the file from a copy)") from None
    if meta is None:
        raise ArtefactError(f"{path}: a safetensors file without cityfed checkpoint metadata "
                            f"(key {_META_KEY!r}); it is not a cityfed checkpoint")
    damaged = (f"{path}: damaged checkpoint metadata (key {_META_KEY!r}: {{}}); start a new run (or restore the "
               "file from a copy)")
    try:
        meta = json.loads(meta)
    except RecursionError:
        raise ArtefactError(damaged.format("nested too deeply to read")) from None
    except ValueError as exc:
        raise ArtefactError(damaged.format(f"not JSON: {type(exc).__name__}")) from None
    if not isinstance(meta, dict):
        raise ArtefactError(damaged.format(f"a JSON {type(meta).__name__}, not an object"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ArtefactError(f"{path}: checkpoint format {shown_value(meta.get('format'))}, this cityfed reads format "
                            f"{CHECKPOINT_FORMAT}; finish the run with the version that wrote it or start a new run")
    try:
        blob = _decode(meta["blob"], tensors)
        if not isinstance(blob, dict):
            raise TypeError(type(blob).__name__)
        blob["arrays"] = {k: tensors[f"arrays/{k}"] for k in meta["array-names"]}
    except KeyError as exc:
        raise ArtefactError(damaged.format(f"missing {shown_value(exc.args[0] if exc.args else '?')}")) from None
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise ArtefactError(damaged.format(f"not the layout this cityfed writes ({type(exc).__name__})")) from None
    return blob


def legacy_message(path: Path) -> str:
    """The error text for a pickle checkpoint of an earlier cityfed (names the file and the fix)."""
    return (f"{path}: a checkpoint.pkl written by an earlier cityfed version. cityfed no longer reads pickle "
            "files (unpickling runs code from the file). Finish this run with the cityfed version that started "
            f"it, or start a new run (a new --run-dir / --out, or remove {Path(path).name}); new runs write "
            f"{CHECKPOINT}")


def require_no_legacy_checkpoint(run_dir: Path) -> None:
    """Stop when ``run_dir`` holds a ``checkpoint.pkl`` but no ``checkpoint.safetensors``.

    Parameters
    ----------
    run_dir : Path

    Raises
    ------
    LegacyCheckpointError
    """
    run_dir = Path(run_dir)
    if (run_dir / LEGACY_CHECKPOINT).exists() and not (run_dir / CHECKPOINT).exists():
        raise LegacyCheckpointError(legacy_message(run_dir / LEGACY_CHECKPOINT))
