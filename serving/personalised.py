"""Serve a node's personalised model (``fl-serve --personalised FILE``) instead of the package's global one.

A run with ``personalise-epochs`` leaves each node a model fine-tuned on its own records
(``clients.personalise``), in the node's own folder, never sent anywhere:
``<ledger folder>/personalised/<department>-<site>/<run id>.safetensors``. The package still
gives the model's kind, the schema and the card; the weights come from the node's file, after
these checks (each refusal names the file, what differs and the fix):

- the file is safetensors (never pickle) with cityfed's personalisation metadata;
- its department, site and run ID are the package's department, the served ``--site`` and the
  package's run;
- its ``base-sha256``, the fingerprint of the global model the node fine-tuned
  (:func:`shared_models.fingerprint.state_sha256`), equals the package's model's: a personalised
  model of another run with the same run ID (an in-process ``fl-sim run`` in a new folder is
  ``sim``) is refused. Files written before 2026-12-05 have no fingerprint; they are served on
  the run ID alone, and ``/model`` says so;
- its tensors are floating point and finite, checked by the package's own check
  (:func:`serving.package.check_weights`): a diverged personalisation (NaN) or integer tensors
  are refused at load, never served as 500s or silently cast;
- its tensors are exactly the model's (an ``average`` file holds two models:
  :class:`shared_models.ensemble.MeanEnsemble`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from serving.package import ModelPackage, PackageError, check_weights, model_builder, sha256_file


class PersonalisedPathError(PackageError):
    """``--personalised`` names no usable personalised model file: missing, a folder, not
    safetensors, or without cityfed's metadata (a bad option value: ``fl-serve`` exits 2).

    A file that is a personalised model but does not fit the package (another department, site,
    run or global model, tensors that do not fit) stays a :class:`PackageError` (exit 1).
    """


#: Metadata a personalised model file must carry (written by ``clients.personalise.handle_personalise``).
REQUIRED = ("run-id", "department", "site")

#: Fix of a personalised file whose weights are not floating point or not finite.
BAD_WEIGHTS_FIX = ("fix: personalise the run again (the node writes finite float weights; a personalisation that "
                   "diverged needs a lower personalise-lr or fewer personalise-epochs), or leave out --personalised "
                   "to serve the package's global model")


def personalised_metadata(path: Path) -> dict[str, str]:
    """The metadata of a personalised model file.

    Raises
    ------
    PersonalisedPathError
        Missing or unreadable file, a folder, not safetensors, or no cityfed personalisation metadata.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    fix = ("fix: give the file the node wrote after a run with personalise-epochs > 0: "
           "<ledger folder>/personalised/<department>-<site>/<run id>.safetensors "
           "(fl-client: the folder of its --ledger file; "
           "fl-sim run: RUN_DIR/ledgers/personalised/)")
    if path.is_dir():
        raise PersonalisedPathError(f"--personalised {path}: a folder, not a file; {fix}")
    if not path.is_file():
        raise PersonalisedPathError(f"--personalised {path}: not found; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except PermissionError as exc:
        raise PersonalisedPathError(f"--personalised {path}: cannot be read ({exc.strerror}); fix: make it readable by "
                                    "this user, or give another file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise PersonalisedPathError(f"--personalised {path}: not a safetensors file ({type(exc).__name__}); "
                                    f"{fix}") from None
    missing = [k for k in REQUIRED if not meta.get(k)]
    if missing:
        raise PersonalisedPathError(f"--personalised {path}: no {', '.join(missing)} in its metadata: not a "
                                    f"personalised model written by cityfed; {fix}")
    return meta


def attach_personalised(package: ModelPackage, path: Path, site: str) -> ModelPackage:
    """``package`` with its model replaced by the node's personalised model in ``path``.

    Parameters
    ----------
    package : ModelPackage
        The verified package of the run that was personalised (:func:`serving.package.load_package`).
    path : Path
        The node's personalised model file.
    site : str
        The site served (``fl-serve --site``): the file must be this site's.

    Returns
    -------
    ModelPackage
        A copy whose ``model`` is the personalised one (eval mode) and whose ``personalised`` says
        which file it is: ``file`` (its name only), ``sha256``, ``kept``, ``dp``, ``epochs``, ``layers``,
        ``noise-multiplier``, ``base-verified``.

    Raises
    ------
    PersonalisedPathError
        The file is missing, a folder, or not a cityfed personalised model (a bad option value).
    PackageError
        The file is of another department, site or run, fine-tuned from another global model,
        its tensors are not floating point or hold NaN or infinite values, or they do not fit
        the package's model.
    """
    from safetensors import SafetensorError

    from clients.personalise import load_personalised, personalised_kept, personalised_model
    from shared_models.fingerprint import state_sha256

    path = Path(path)
    meta = personalised_metadata(path)
    card_run = str(package.card.get("run-id", ""))
    for key, want, what in (("department", package.department, "the package's department"),
                            ("site", site, "the site served (--site)"), ("run-id", card_run, "the package's run")):
        if meta[key] != want:
            raise PackageError(f"--personalised {path}: metadata {key} = {meta[key]!r}, but {what} is {want!r}; fix: "
                               f"give the file of site {site!r} personalised in run {card_run!r} "
                               f"(<ledger folder>/personalised/{package.department}-{site}/{card_run}.safetensors), "
                               "or serve the package of the run it was personalised in")
    base = meta.get("base-sha256")
    here = state_sha256(package.model.state_dict())
    if base is not None and base != here:
        raise PackageError(f"--personalised {path}: fine-tuned from a global model with fingerprint {base[:16]}..., "
                           f"but {package.path}'s model is {here[:16]}...: it belongs to another run with the same "
                           f"run ID {card_run!r}; fix: serve the package exported from the run folder it was "
                           "personalised in")
    try:
        kept = personalised_kept(path)
        check_weights(load_personalised(path), f"--personalised {path}", damaged="the file",
                      made_by="the personalisation", fix=BAD_WEIGHTS_FIX)
        task = str(package.schema.get("task", ""))
        model = personalised_model(path, model_builder(package.path, package.model_config), task)
    except PackageError:  # check_weights: already names the file, the tensor and the fix
        raise
    except ValueError as exc:  # a bad `kept`
        raise PackageError(f"--personalised {path}: {exc}") from None
    except SafetensorError as exc:
        raise PackageError(f"--personalised {path}: its tensors cannot be read ({exc}); the file is damaged; fix: "
                           "personalise the run again, or restore the file from the node's backup") from None
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys, shapes (names only, no values)
        why = " ".join(str(exc).split())[:500] or type(exc).__name__
        raise PackageError(f"--personalised {path}: its tensors do not fit the package's {package.model_config.get('kind')} "
                           f"model ({why}); fix: serve it with the package of the run it was personalised in") from None
    model.eval()
    # the name, not the path: /model answers every API-key holder, who need not learn the node's folders
    info = {"file": path.name, "sha256": sha256_file(path), "kept": kept, "dp": meta.get("dp") == "True",
            "epochs": meta.get("epochs"), "layers": meta.get("layers"), "noise-multiplier": meta.get("noise-multiplier"),
            "base-verified": base is not None}
    return dataclasses.replace(package, model=model, personalised=info)
