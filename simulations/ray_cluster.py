"""Ray resources of a simulation: a local Ray instance, or an existing Ray cluster (``--ray-address``).

Flower's Ray backend calls ``ray.init(**backend_config["init_args"])`` and places one actor per
``client_resources`` that fits on each Ray node. :func:`backend_config` builds that config;
:func:`check_cluster` checks an existing cluster answers and has what the clients ask for,
before Flower connects (an unreachable address would otherwise hang in ``ray.init``).

Connecting to an existing cluster: Flower gives Ray's workers the driver's ``sys.path`` as
``PYTHONPATH`` (its Ray backend sets the job's ``runtime_env`` itself, so no ``working_dir`` can
be added through the backend config). Every Ray node must therefore run the same Python
environment with cityfed installed at the same path: on one machine (the loopback test) the
nodes share this virtualenv; across machines, install the same release at the same path on
each (or share it over a network file system). The workers inherit the environment of
``ray start``, not of ``fl-sim``: set ``CITYFED_DEVICE`` or ``CITYFED_DP_SEED_FROM_JOB`` there.
At the end Flower's backend calls ``ray.shutdown()``, which only disconnects this driver: the
cluster keeps running.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

#: How long :func:`check_cluster` waits for Ray to connect and report the cluster's resources.
CONNECT_TIMEOUT_S = 60.0
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})$")


def parse_address(address: str) -> tuple[str, int] | None:
    """Check the form of a Ray address: ``auto`` (``None`` returned) or ``HOST:PORT``.

    Parameters
    ----------
    address : str
        ``auto`` (Ray finds the cluster: ``$RAY_ADDRESS`` or the latest one started on this
        machine) or the head node's GCS address as ``ray start --head`` prints it, e.g.
        ``127.0.0.1:6379``.

    Returns
    -------
    (str, int) or None
        Host and port, or ``None`` for ``auto``.

    Raises
    ------
    ValueError
        Any other form (a URL scheme such as ``ray://`` - Ray Client is not supported by Flower's
        backend -, no port, a port outside 1-65535).
    """
    if address == "auto":
        return None
    m = _HOST_PORT.match(address.strip())
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise ValueError(f"--ray-address {address!r}: expected HOST:PORT of the Ray head (as `ray start --head` "
                         "prints it, e.g. 127.0.0.1:6379) or 'auto'; ray:// (Ray Client) addresses are not supported")
    return m["host"].strip("[]"), int(m["port"])


def check_gpu_form(gpus_per_client: float) -> None:
    """Raise unless ``gpus_per_client`` is a fraction in [0, 1] or a whole number (Ray's rule)."""
    if gpus_per_client < 0 or (gpus_per_client > 1 and gpus_per_client != int(gpus_per_client)):
        raise ValueError(f"--gpus-per-client {gpus_per_client:g}: use a fraction in [0, 1] or a whole number of GPUs")


def check_gpus(gpus_per_client: float, gpus_in_cluster: float, where: str) -> None:
    """Raise when clients ask for GPUs that ``where`` does not have.

    Parameters
    ----------
    gpus_per_client : float
        ``--gpus-per-client`` (>= 0; above 1 a whole number, as Ray requires).
    gpus_in_cluster : float
        GPUs Ray (or torch, for a local Ray) sees.
    where : str
        What was asked, for the message (``"this machine"``, ``"the Ray cluster at ADDR"``).

    Raises
    ------
    ValueError
        Naming both numbers and the fix.
    """
    check_gpu_form(gpus_per_client)
    if gpus_per_client > 0 and gpus_in_cluster <= 0:
        raise ValueError(f"--gpus-per-client {gpus_per_client:g} asks for GPUs but {where} has none (GPUs seen: "
                         f"{gpus_in_cluster:g}); use --gpus-per-client 0, or start the Ray nodes on GPU machines "
                         "(`ray start ... --num-gpus N`)")
    if gpus_per_client > gpus_in_cluster > 0:
        raise ValueError(f"--gpus-per-client {gpus_per_client:g} is more than {where} has (GPUs: {gpus_in_cluster:g}); "
                         "lower it (a fraction shares a GPU between clients)")


_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, logging_level="ERROR")
nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
print(json.dumps({"resources": ray.cluster_resources(), "nodes": len(nodes),
                  "node_resources": [n["Resources"] for n in nodes]}))
ray.shutdown()
"""


def check_cluster(address: str, gpus_per_client: float = 0.0, cpus_per_client: float = 1.0,
                  timeout: float = CONNECT_TIMEOUT_S) -> dict:
    """Check an existing Ray cluster answers at ``address`` and can host the clients.

    A TCP connection to ``HOST:PORT`` first (a closed port fails in milliseconds), then a short
    Ray driver in a subprocess (``ray.init(address=...)``, ended after ``timeout``) reports the
    cluster's resources.

    Parameters
    ----------
    address : str
        See :func:`parse_address`.
    gpus_per_client, cpus_per_client : float
        What each simulated client asks of Ray.
    timeout : float
        Seconds to wait for the Ray driver.

    Returns
    -------
    dict
        ``resources`` (``ray.cluster_resources()``), ``nodes`` (alive nodes with resources),
        ``node_resources`` (each node's).

    Raises
    ------
    ValueError
        Bad form, nothing listening, Ray not answering, no GPU for GPU clients, or no node with
        ``cpus_per_client`` CPUs - each naming the address and the fix.
    """
    hostport = parse_address(address)
    if hostport is not None:
        try:
            socket.create_connection(hostport, timeout=5.0).close()
        except OSError as exc:
            raise ValueError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); start "
                             f"one with `ray start --head --port {hostport[1]}` (then `ray start --address "
                             f"{address}` on the other machines), or give the address `ray start --head` "
                             "printed") from None
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ValueError(f"--ray-address {address}: Ray did not connect within {timeout:.0f} s; check "
                         "`ray status --address ADDR` on the head node") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ValueError(f"--ray-address {address}: could not connect to a Ray cluster: {last[:300]}; check "
                         "`ray status` on the head node (for 'auto': start one with `ray start --head` or set "
                         "RAY_ADDRESS)")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    check_gpus(gpus_per_client, float(info["resources"].get("GPU", 0.0)), f"the Ray cluster at {address}")
    if not any(float(r.get("CPU", 0.0)) >= cpus_per_client for r in info["node_resources"]):
        raise ValueError(f"--ray-address {address}: no Ray node has {cpus_per_client:g} CPU(s) for a client "
                         f"(nodes' CPUs: {[r.get('CPU', 0) for r in info['node_resources']]}); start nodes with "
                         "more `--num-cpus`")
    return info


def backend_config(cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
                   ray_address: str | None = None) -> dict:
    """Flower's Ray backend config for a local Ray instance or an existing cluster.

    Parameters
    ----------
    cpus_per_client, gpus_per_client : float
        Ray resources of each simulated client (its actor).
    ray_address : str, optional
        An existing cluster (:func:`parse_address`); ``None`` starts Ray on this machine with
        all its CPUs (Ray detects its GPUs).

    Returns
    -------
    dict
        ``client_resources`` and ``init_args`` (passed to ``ray.init``; with an address it
        carries no ``num_cpus``: Ray refuses resources when connecting to a cluster).

    Raises
    ------
    ValueError
        A bad address form, or GPU clients on a local machine without CUDA.
    """
    if cpus_per_client <= 0:
        raise ValueError(f"cpus per client {cpus_per_client:g}: must be > 0")
    resources = {"num_cpus": float(cpus_per_client), "num_gpus": float(gpus_per_client)}
    if ray_address is None:
        if gpus_per_client:
            import torch

            check_gpus(gpus_per_client, float(torch.cuda.device_count()), "this machine")
        return {"client_resources": resources,
                "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}
    parse_address(ray_address)
    check_gpu_form(gpus_per_client)  # check_cluster counts the cluster's GPUs
    return {"client_resources": resources, "init_args": {"address": ray_address, "include_dashboard": False}}
