"""The export commands: ``fl-sim export-model RUN_DIR -o DIR`` and ``fl-server export RUN -o DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

_console = Console(emoji=False)


def _report(out: Path, manifest: dict) -> None:
    _console.print(f"wrote model package {escape(str(out))} (run {escape(str(manifest['run-id']))}, "
                   f"{manifest['department']}): {', '.join(manifest['files'])}, MANIFEST.json", highlight=False, soft_wrap=True)
    _console.print(f"MANIFEST.json SHA-256: {manifest['manifest-sha256']} (pin it: fl-serve --manifest-sha256)",
                   highlight=False, soft_wrap=True)


def export_model(
    run_dir: Annotated[Path, typer.Argument(help="Run folder of a finished simulation (fl-sim run -o DIR): "
                                            "results.json, model.safetensors, ledgers/.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Package folder to create (new or empty).")],
) -> None:
    """Write a run's model package: weights (safetensors), model config, data schema, model card (JSON + Markdown), SHA-256 manifest.

    The card records the run ID, strategy, rounds, the sites that trained, epsilon and delta per site and per mechanism (from the run's ledgers), metrics per site, data source versions and the creation time. Serve it on a department node with `fl-serve DIR --site SITE`.

    A results.json or launch.json that is empty, not UTF-8 (or has a byte-order mark), not JSON, not a JSON object, or has a field of the wrong type is refused (exit 2) naming the file, the field and a fix; so is a ledger in ledgers/ that cannot be read (the card must record epsilon per site: a damaged ledger is not left out as if there were none). Nothing is written.
    """
    from serving.package import PackageError, export_package

    try:
        manifest = export_package(run_dir, out, made_by="fl-sim export-model")
    except PackageError as exc:
        raise typer.BadParameter(str(exc), param_hint="RUN_DIR / --out") from None
    _report(out, manifest)


def server_export(
    run: Annotated[str, typer.Argument(help="Run ID or run folder name (from `fl-server runs`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Package folder to create (new or empty).")],
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", help="Coordinator state folder (default: "
                                                      "$CITYFED_STATE_DIR or ~/.cityfed/coordinator).")] = None,
    runs_dir: Annotated[Optional[Path], typer.Option("--runs-dir", help="Folder of run folders (default: "
                                                     "<state-dir>/runs).")] = None,
) -> None:
    """Write a finished run's model package (weights, model config, data schema, model card, SHA-256 manifest).

    Nodes are named by their node ID in the card (the coordinator does not know their sites);
    epsilon per site is what each node reported (its ledger stays on the node). Copy the folder
    to a department node and serve it there with `fl-serve DIR --site SITE`. A damaged results.json,
    launch.json or ledger is refused (exit 2) naming the file and a fix; nothing is written.
    """
    from server.cli import CliError, _errors, _runs_dir, _state, resolve_run
    from serving.package import PackageError, export_package

    with _errors():
        runs = _runs_dir(_state(state_dir), runs_dir)
        rec = resolve_run(runs, run)
        try:
            folder = Path(run).expanduser() if Path(run).expanduser().is_absolute() else runs / rec["folder"]
            manifest = export_package(folder, out, sites=[], made_by="fl-server export")
        except PackageError as exc:
            raise CliError(str(exc)) from None
    _report(out, manifest)
