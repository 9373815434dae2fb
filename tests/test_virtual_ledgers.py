"""A simulation's ledger folder accounts for one set of nodes: the department's sites, or one partition of them.

Found by a review (2026-12-07, s18 findings 2, 3 and 5):

* ``--resume`` with another ``--virtual-sites`` count re-partitioned the records mid-run: a record
  trained as virtual-2 of 4 and then as virtual-5 of 8 spent about epsilon 4.1 in one run with
  target 3, while every ledger said <= 3 (each virtual site's ledger never saw its other releases);
* a ``--virtual-sites`` run into an ``--out`` whose hospitals' ledgers had refused any further
  release (Switzerland 7.38 of 8) was accepted and trained on the same patients under fresh
  ledgers (about epsilon 8.3 > 8 for Switzerland's patients); the reverse too;
* a Dirichlet split with empty virtual sites passed the up-front checks, 4 of 20 sites trained a
  round (spending budget), then the run stopped with exit 1.
"""

from __future__ import annotations

import pytest

from sim_helpers import assert_input_error, copy_run, fl_sim, ledger_bytes

BASE = ["run", "-d", "health", "-r", "1", "--local-epochs", "1", "--engine", "inprocess"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Finished one-round health runs: one on 4 IID virtual sites, one on the hospitals."""
    from simulations.run import simulate

    base = tmp_path_factory.mktemp("vruns")
    cfg = {"department": "health", "num-rounds": 1, "local-epochs": 1, "target-epsilon": 3.0, "min-nodes": 1}
    simulate({**cfg, "run-dir": str(base / "virtual"), "run-id": "v", "virtual-sites": 4}, engine="inprocess")
    simulate({**cfg, "run-dir": str(base / "natural"), "run-id": "n"}, engine="inprocess")
    return {"virtual": base / "virtual", "natural": base / "natural"}


@pytest.mark.parametrize("args", [
    ["-r", "2", "--resume", "--virtual-sites", "8"],          # finding 2: re-partitioned mid-run
    ["-r", "1", "--virtual-sites", "8"],                      # a new run on another partition of the same records
    ["-r", "1", "--virtual-sites", "4", "--seed", "1"],       # the same count, other records in each site
    ["-r", "1", "--virtual-sites", "4", "--partitioner", "dirichlet"],
    ["-r", "1"],                                              # the hospitals' own nodes, fresh ledgers
])
def test_another_set_of_nodes_is_refused_in_a_virtual_run_folder(runs, tmp_path, capsys, monkeypatch, args):
    out = copy_run(runs["virtual"], tmp_path / "out")
    before = ledger_bytes(out)
    code, o, e = fl_sim([*BASE[:3], *BASE[5:], "-o", out, *args], capsys, monkeypatch)
    assert_input_error(code, o, e)
    assert str(out / "ledgers") in e and "4 virtual sites" in e and "another --out" in e, e
    assert ledger_bytes(out) == before  # refused before any node trained


def test_virtual_sites_are_refused_in_a_folder_of_the_hospitals_ledgers(runs, tmp_path, capsys, monkeypatch):
    out = copy_run(runs["natural"], tmp_path / "out")
    before = ledger_bytes(out)
    code, o, e = fl_sim([*BASE, "-o", out, "--virtual-sites", "4"], capsys, monkeypatch)
    assert_input_error(code, o, e)
    assert "--virtual-sites" in e and "the department's own sites" in e, e
    assert ledger_bytes(out) == before


def test_the_same_nodes_again_share_their_ledgers(runs, tmp_path, capsys, monkeypatch):
    """What stays allowed: the same partition (or the same hospitals) again composes in the same ledgers."""
    from privacy.ledger import PrivacyLedger

    for kind, extra in (("virtual", ["--virtual-sites", "4"]), ("natural", [])):
        out = copy_run(runs[kind], tmp_path / kind / "out")
        rows = {p.name: len(PrivacyLedger(p).releases()) for p in (out / "ledgers").glob("*.sqlite")}
        code, o, e = fl_sim([*BASE, "-o", out, *extra], capsys, monkeypatch)
        assert code == 0, (o, e)
        after = {p.name: len(PrivacyLedger(p).releases()) for p in (out / "ledgers").glob("*.sqlite")}
        assert after.keys() == rows.keys() and all(after[k] > rows[k] for k in rows)


def test_simulate_refuses_it_too(runs, tmp_path):
    """The API (fl-sim compare, scripts) checks the folder as fl-sim does, before any node trains."""
    from privacy.ledger_partition import LedgerPartitionError
    from simulations.run import simulate

    out = copy_run(runs["virtual"], tmp_path / "out")
    before = ledger_bytes(out)
    with pytest.raises(LedgerPartitionError, match="4 virtual sites"):
        simulate({"department": "health", "num-rounds": 1, "local-epochs": 1, "target-epsilon": 3.0, "min-nodes": 1,
                  "run-dir": str(out), "run-id": "x", "virtual-sites": 8}, engine="inprocess")
    assert ledger_bytes(out) == before


def test_a_dirichlet_split_with_empty_sites_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import simulations.cli as cli

    def never(*a, **k):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(cli, "_run_one", never)
    out = tmp_path / "out"
    code, o, e = fl_sim([*BASE, "-o", out, "--virtual-sites", "20", "--partitioner", "dirichlet", "--alpha", "0.05"],
                        capsys, monkeypatch)
    assert_input_error(code, o, e)
    assert "--virtual-sites" in e and "--alpha" in e and "no training record" in e, e
    assert not (out / "ledgers").exists()
