"""``fl-sim run --ray-address``: an existing Ray cluster (two Ray nodes on this machine), and the checks before it.

The slow test starts its own two-node cluster (each node with its own ``--temp-dir`` and free
ports, in its own process group) and stops it by killing those process groups: ``ray stop``
would stop every Ray process of the user, including other simulations on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from simulations.ray_cluster import backend_config, check_cluster, check_gpus, parse_address

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _invoke(*args: str) -> tuple[int, str]:
    """``fl-sim run ARGS`` in this process (the option checks; no run starts): exit code, output."""
    from typer.testing import CliRunner

    from simulations.cli import app

    res = CliRunner().invoke(app, ["run", *args], env={"COLUMNS": "200"})
    return res.exit_code, " ".join(res.output.split())


def _fl_sim(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fl-sim"), "run", *args], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, "COLUMNS": "200"}, cwd=ROOT)


@pytest.mark.parametrize("address,expected", [("127.0.0.1:6379", ("127.0.0.1", 6379)), ("auto", None),
                                              ("head.city.example:10001", ("head.city.example", 10001)),
                                              ("[::1]:6379", ("::1", 6379))])
def test_address_forms(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("bad", ["127.0.0.1", "ray://127.0.0.1:10001", "127.0.0.1:0", "127.0.0.1:70000", "", ":6379"])
def test_bad_address_forms_are_refused(bad):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_address(bad)


def test_backend_config_local_and_cluster():
    local = backend_config(1.0, 0.0)
    assert local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert local["init_args"]["num_cpus"] == (os.cpu_count() or 1)
    cluster = backend_config(2.0, 0.5, "127.0.0.1:6379")
    # Ray refuses num_cpus/num_gpus in ray.init when connecting to a cluster
    assert cluster["init_args"] == {"address": "127.0.0.1:6379", "include_dashboard": False}
    assert cluster["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    with pytest.raises(ValueError, match="whole number"):
        backend_config(1.0, 1.5, "127.0.0.1:6379")


def test_gpu_clients_need_gpus():
    with pytest.raises(ValueError, match=r"--gpus-per-client 0.5 asks for GPUs but the Ray cluster at A:1 has none"):
        check_gpus(0.5, 0.0, "the Ray cluster at A:1")
    with pytest.raises(ValueError, match="more than"):
        check_gpus(2, 1.0, "this machine")
    check_gpus(0.25, 1.0, "this machine")
    check_gpus(0.0, 0.0, "this machine")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_clients_on_a_machine_without_gpu_stop_before_ray():
    with pytest.raises(ValueError, match="--gpus-per-client 1 asks for GPUs but this machine has none"):
        backend_config(1.0, 1.0)
    code, out = _invoke("-d", "health", "-r", "1", "--gpus-per-client", "1", "--out", tempfile.mkdtemp())
    assert code == 2 and "--gpus-per-client 1 asks for GPUs but this machine has none" in out, out


def test_unreachable_address_names_it_and_the_fix():
    port = _free_port()  # nobody listens there
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"--ray-address 127.0.0.1:{port}: no Ray cluster answers there.*ray start --head --port {port}"):
        check_cluster(f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 10  # not ray.init's endless retries
    code, out = _invoke("-d", "health", "-r", "1", "--ray-address", f"127.0.0.1:{port}", "--out", tempfile.mkdtemp())
    assert code == 2 and f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there" in out, out
    code, out = _invoke("-d", "health", "--ray-address", "localhost", "--out", tempfile.mkdtemp())
    assert code == 2 and "expected HOST:PORT" in out, out
    code, out = _invoke("-d", "health", "--engine", "inprocess", "--ray-address", "127.0.0.1:1", "--out",
                        tempfile.mkdtemp())
    assert code == 2 and "need --engine ray" in out, out


# ---------------------------------------------------------------------------------------------
# a real cluster: head + one more node on this machine


def _ray_start(args: list[str], env: dict) -> int:
    """Run ``ray start`` in a new process group (its daemons stay in it); return the group id."""
    proc = subprocess.Popen([str(BIN / "ray"), "start", *args, "--disable-usage-stats"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, _ = proc.communicate(timeout=180)
    if proc.returncode != 0:
        _kill_group(proc.pid)
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-3000:]}")
    return proc.pid


def _kill_group(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a second Ray node, 1 CPU each, own temp dirs and ports; stopped by process group."""
    port = _free_port()
    dirs = [Path(tempfile.mkdtemp(prefix="rc", dir="/tmp")) for _ in range(2)]  # short: Ray's socket paths
    # the nodes' workers inherit this environment (not fl-sim's): each ClientApp logs its compute time
    env = {**ENV, "CITYFED_LOG_COMPUTE": "1", "PYTHONWARNINGS": "ignore"}
    common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(200 * 2**20)]
    groups = []
    try:
        groups.append(_ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                  "--include-dashboard", "false", "--dashboard-port", str(_free_port()),
                                  "--ray-client-server-port", str(_free_port()),
                                  "--dashboard-agent-listen-port", str(_free_port()), "--temp-dir", str(dirs[0]),
                                  *common], env))
        groups.append(_ray_start(["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                                  "--dashboard-agent-listen-port",
                                  str(_free_port()), "--temp-dir", str(dirs[1]), *common], env))
        yield {"address": f"127.0.0.1:{port}", "dirs": dirs}
    finally:
        for g in reversed(groups):
            _kill_group(g)
        import shutil

        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _node_logs(d: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (d / "session_latest" / "logs").glob("worker-*"))


@pytest.mark.slow
def test_fl_sim_runs_on_a_two_node_ray_cluster(ray_cluster, tmp_path):
    addr = ray_cluster["address"]
    info = check_cluster(addr)
    assert info["nodes"] == 2 and info["resources"]["CPU"] == 2.0

    out = tmp_path / "run"
    r = _fl_sim("-d", "health", "-r", "2", "--local-epochs", "1", "--ray-address", addr, "--out", str(out))
    text = " ".join(r.stdout.split())
    assert r.returncode == 0, text[-3000:] + r.stderr[-3000:]
    assert f"Ray cluster at {addr}: 2 node(s), 2 CPUs, 0 GPUs" in text
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and [e["round"] for e in results["rounds"]] == [1, 2]
    assert all(e["train"]["accepted"] == 4 for e in results["rounds"])  # the 4 hospitals, every round
    assert (out / "model.safetensors").stat().st_size > 0
    # one ClientApp actor per Ray node (1 CPU each), and both trained: each node's own worker logs
    for d in ray_cluster["dirs"]:
        logs = _node_logs(d)
        assert ":actor_name:ClientAppActor" in logs, f"no ClientApp actor ran on the Ray node of {d}"
        assert "cityfed: train compute" in logs, f"the ClientApp actor on the Ray node of {d} trained nothing"

    # the cluster is still up after the run (Flower only disconnected), and has no GPU for GPU clients
    r = _fl_sim("-d", "health", "-r", "1", "--ray-address", addr, "--gpus-per-client", "0.5", "--out",
                str(tmp_path / "gpu"), timeout=180)
    text = " ".join((r.stdout + r.stderr).split())  # fl-sim's errors go to standard error
    assert r.returncode == 2 and f"--gpus-per-client 0.5 asks for GPUs but the Ray cluster at {addr} has none" in text, text


@pytest.mark.slow
def test_a_gpu_less_actor_trains_on_cpu_even_where_torch_sees_cuda(ray_cluster):
    """In a Ray actor given no GPU, 'auto' means CPU, whatever torch.cuda.is_available() says."""
    import ray

    ray.init(address=ray_cluster["address"], include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}})
    try:
        @ray.remote(num_cpus=1, num_gpus=0)
        class Probe:
            def device(self):
                import torch as t

                from shared_models.device import pick_device

                t.cuda.is_available = lambda: True  # as on a GPU machine
                return str(pick_device())

        probe = Probe.remote()
        assert ray.get(probe.device.remote(), timeout=120) == "cpu"
        ray.kill(probe)
    finally:
        ray.shutdown()
