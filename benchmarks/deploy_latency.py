"""Deployment round latency on loopback: where a round's time goes, Flower's defaults vs cityfed's.

One invocation builds a city on 127.0.0.1 (CA, coordinator with TLS and node authentication,
3 health hospitals, each with only its own records), then runs the same health job
(``fl-server run --department health``) under each setting, one after another:

* ``flower``: Flower 1.41 as shipped: a new ``flwr-clientapp`` process per message
  (``fl-client --cold``), SuperNode idle poll 3 s, SuperExec poll 1 s, ServerApp grid poll 3 s;
* ``cityfed``: ``fl-client``'s default: one warm ClientApp worker per node
  (:mod:`clients.warm`), SuperNode/SuperExec/grid polling 0.1 s, the SuperNode's idle poll
  1 s once no message came for 30 s (``CITYFED_NODE_IDLE_POLL_S``);
* ``always-fast`` (not run by default): ``cityfed`` with the idle poll at 0.1 s too, as before
  2026-12-07.

Each setting runs with SecAgg+ off and on (``--secagg both``, the default; ``fl-server run``
uses SecAgg+ by default). Per round it reports the round time (train phase + evaluate phase,
timed by the ServerApp, from ``results.json``), the compute (the slowest node's DP-SGD
training plus the slowest node's evaluation, logged by each ClientApp as ``cityfed: ... compute``;
with the example policy's default, ``local_evaluation = "off"``, nodes do not evaluate: the run
is scored on the coordinator's copy of the public UCI data, ``central-data``, and a round is its
train phase)
and the framework share ``1 - compute / round time``: process starts, imports, polling,
transfer, SecAgg+ protocol. It then splits each steady-state round along its critical path
(:func:`breakdown`), from the ServerApp's phase start times (``results.json``) and the
SuperNodes' timestamped "Receiving / Received / Sending / Sent" log lines.

Before each setting's run it also measures what the deployment costs while **idle** (the three
nodes online for 35 s, no run): the CPU the coordinator (``fl-server start``: SuperLink, SuperExec,
supervisor) and each node (``fl-client`` and its SuperNode, SuperExec and worker) use over
``--idle`` seconds, as a share of one core, read from ``/proc`` (Linux).

    python benchmarks/deploy_latency.py [--rounds 3] [--settings flower cityfed] [--secagg both] [--idle 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_deploy_slow import BIN, POLICY, SITES, City, free_port, slug  # noqa: E402

SETTINGS = {
    # Flower's own values (CITYFED_GRID_POLL_S=0: ServerApp uses Flower's 3 s loop)
    "flower": {"node_args": ["--cold"], "env": {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0", "CITYFED_GRID_POLL_S": "0"}},
    "cityfed": {"node_args": [], "env": {}},
    # cityfed before the idle backoff (2026-12-07): the SuperNode polls every 0.1 s even when idle
    "always-fast": {"node_args": [], "env": {"CITYFED_NODE_IDLE_POLL_S": "0.1"}},
}
COMPUTE = re.compile(r"cityfed: (train|evaluate) compute ([0-9.]+) s")
# the SuperNode's own log lines (fl-client turns Flower's timestamps on), one set per message
NODE_EVENT = re.compile(r"^(?:\x1b\[[0-9;]*m)?INFO (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})(?:\x1b\[[0-9;]*m)?:\s+"
                        r"(Receiving: \w+ message|Received successfully|Sending: \w+ message|Sent successfully)", re.M)
#: where a phase's time goes, in the order of a message's path (see :func:`breakdown`)
PARTS = ("to_node", "downlink", "clientapp", "compute", "uplink", "to_server")
PART_TITLES = {
    "to_node": "ServerApp push + node poll wait",
    "downlink": "node pulls the message (SuperLink -> SuperNode)",
    "clientapp": "ClientApp start/pickup, pull, push (node-local)",
    "compute": "compute (DP-SGD / evaluation)",
    "uplink": "node pushes the reply (SuperNode -> SuperLink)",
    "to_server": "ServerApp poll, pull, aggregate, checkpoint",
}


def node_exchanges(text: str) -> list[dict]:
    """One dict per message a SuperNode handled: ``rs`` received-start, ``rd`` received, ``ss`` sending, ``sd`` sent (Unix s)."""
    from datetime import datetime

    out: list[dict] = []
    cur: dict = {}
    for stamp, what in NODE_EVENT.findall(text):
        t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as Flower writes it
        if what.startswith("Receiving"):
            cur = {"rs": t}
        elif what == "Received successfully" and "rs" in cur:
            cur["rd"] = t
        elif what.startswith("Sending") and "rd" in cur:
            cur["ss"] = t
        elif what == "Sent successfully" and "ss" in cur:
            cur["sd"] = t
            out.append(cur)
            cur = {}
    return out


def breakdown(start: float, seconds: float, exchanges: dict[str, list[dict]], compute: float) -> dict:
    """Split one phase (``start`` .. ``start + seconds``, ServerApp clock) along its critical path.

    A phase is one message exchange per node (four under SecAgg+'s train step). For each
    exchange the node whose reply was sent last is on the critical path: the time from the
    previous boundary (phase start, or the previous exchange's last reply) until that node
    starts receiving is ``to_node``; its receive, ClientApp and send windows are ``downlink``,
    ``clientapp`` (minus ``compute``, the slowest node's own compute for the phase) and
    ``uplink``; what follows the last reply is ``to_server``. The parts add up to ``seconds``.
    """
    end = start + seconds
    per_node = [[x for x in xs if start <= x["rs"] <= end] for xs in exchanges.values()]
    parts = dict.fromkeys(PARTS, 0.0)
    boundary = start
    for k in range(max((len(xs) for xs in per_node), default=0)):
        group = [xs[k] for xs in per_node if len(xs) > k]
        crit = max(group, key=lambda x: x["sd"])
        parts["to_node"] += crit["rs"] - boundary
        parts["downlink"] += crit["rd"] - crit["rs"]
        parts["clientapp"] += crit["ss"] - crit["rd"]
        parts["uplink"] += crit["sd"] - crit["ss"]
        boundary = crit["sd"]
    parts["clientapp"] -= compute
    parts["compute"] = compute
    parts["to_server"] = end - boundary
    return parts


def start_node(city: City, site: str, tag: str, setting: dict):
    name = slug(site)
    cmd = [str(BIN / "fl-client"), "--department", "health", "--site", site,
           "--data", str(city.base / "data" / f"{name}.csv"), "--policy", str(POLICY),
           "--coordinator", f"127.0.0.1:{city.port}", "--ca", str(city.ca),
           "--key", str(city.base / "keys" / f"{name}-{tag}" / "node.key"),
           # a fresh lifetime budget per setting: its own ledger, so its own key (a node refuses a
           # key whose releases another ledger holds)
           "--ledger", str(city.base / "ledgers" / f"{name}-{tag}.sqlite"),
           "--state-dir", str(city.base / f"node-{name}-{tag}"), "--runtime-port", str(free_port()),
           *setting["node_args"]]
    return city.start(cmd, f"node-{name}-{tag}", setting["env"])


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (``/proc``; exited ones are not counted)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    return total


def idle_cpu(coordinator_pid: int, nodes: dict, seconds: float) -> dict:
    """Share of one core the coordinator and each node use over ``seconds`` with no run."""
    before = {"coordinator": tree_cpu_seconds(coordinator_pid), **{s: tree_cpu_seconds(p.pid) for s, p in nodes.items()}}
    time.sleep(seconds)
    after = {"coordinator": tree_cpu_seconds(coordinator_pid), **{s: tree_cpu_seconds(p.pid) for s, p in nodes.items()}}
    return {k: (after[k] - before[k]) / seconds for k in before}


def measure(city: City, tag: str, setting: dict, rounds: int, secagg: bool, ids: dict, idle: float = 0.0) -> dict:
    city.start_coordinator(setting["env"])
    nodes = {site: start_node(city, site, tag, setting) for site in SITES}
    try:
        city.wait_online(ids.values())
        idle_share = None
        if idle > 0:
            from flower_compat.warm import HOT_S

            time.sleep(HOT_S + 5)  # start-up over, and the nodes' idle polls backed off (if they do)
            idle_share = idle_cpu(city.coordinator.pid, nodes, idle)
        t0 = time.monotonic()
        # the example policy's default: nodes do not score the coordinator's models (local_evaluation
        # "off"), so the run is scored on data the coordinator holds and has no node evaluate phase
        res = city.fl_server("run", "--department", "health", "--rounds", str(rounds), "--name", tag,
                             *([] if secagg else ["--no-secagg"]), "--run-config", "min-nodes=3",
                             "--run-config", "round-timeout=300", "--run-config", f"central-data={city.reference}",
                             "--run-config", "fraction-evaluate=0")
        run_id = res.stdout.strip().splitlines()[-1]
        run = city.wait_run(run_id, 120 + 200 * rounds)
        wall = time.monotonic() - t0
        assert run["status"] == "finished:completed", city.fl_server("logs", run_id).stdout[-3000:]
        results = json.loads((city.state / "runs" / tag / "results.json").read_text())
        per_node = {}
        for site, proc in nodes.items():
            found = COMPUTE.findall(proc.text())
            per_node[site] = {"train": [float(s) for k, s in found if k == "train"],
                              "evaluate": [float(s) for k, s in found if k == "evaluate"]}
            assert len(per_node[site]["train"]) == rounds and len(per_node[site]["evaluate"]) in (0, rounds), (site, found)
        exchanges = {site: node_exchanges(proc.text()) for site, proc in nodes.items()}
        rows = []
        for i, r in enumerate(results["rounds"]):
            evaluated = bool(r.get("evaluate")) and all(n["evaluate"] for n in per_node.values())
            train_s, eval_s = float(r["train"]["seconds"]), float(r["evaluate"]["seconds"]) if evaluated else 0.0
            c_train = max(n["train"][i] for n in per_node.values())
            c_eval = max(n["evaluate"][i] for n in per_node.values()) if evaluated else 0.0
            compute = c_train + c_eval
            parts = {}
            for phase, c in (("train", c_train), ("evaluate", c_eval)) if evaluated else (("train", c_train),):
                for k, v in breakdown(float(r[phase]["started"]), float(r[phase]["seconds"]), exchanges, c).items():
                    parts[k] = parts.get(k, 0.0) + v
            rows.append({"round": r["round"], "train_s": train_s, "evaluate_s": eval_s, "round_s": train_s + eval_s,
                         "compute_s": compute, "framework_share": 1.0 - compute / (train_s + eval_s),
                         "breakdown_s": parts, "roc_auc": (r.get("central") or {}).get("roc-auc")})
        return {"setting": tag, "secagg": secagg, "rounds": rows, "launch_to_finish_s": wall, "per_node": per_node,
                "idle_core_share": idle_share, "idle_seconds": idle}
    finally:
        for proc in nodes.values():
            proc.stop()
        city.coordinator.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settings", nargs="*", default=["flower", "cityfed"], choices=list(SETTINGS))
    ap.add_argument("--secagg", choices=["off", "on", "both"], default="both")
    ap.add_argument("--idle", type=float, default=30.0,
                    help="seconds of idle CPU measurement (nodes online, no run) before each run; 0 = none")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (0 <= args.idle <= 3600):
        ap.error(f"--idle {args.idle}: must be seconds from 0 to 3600")
    secaggs = {"off": [False], "on": [True], "both": [False, True]}[args.secagg]
    base = Path(tempfile.mkdtemp(prefix="latency-", dir="/tmp"))
    city = City(base)
    out = []
    try:
        from privacy import pki

        tags = [(secagg, name, f"{name}-{'secagg' if secagg else 'plain'}") for secagg in secaggs for name in args.settings]
        city.start_coordinator()
        ids = {}
        for _, _, tag in tags:
            for site in SITES:
                pki.create_node_key(city.base / "keys" / f"{slug(site)}-{tag}", "health", f"{slug(site)}-{tag}")
            ids[tag] = {site: city.register(f"{slug(site)}-{tag}") for site in SITES}
        city.coordinator.stop()
        for secagg, name, tag in tags:
            print(f"measuring {tag} ({args.rounds} rounds) ...", file=sys.stderr, flush=True)
            out.append(measure(city, tag, SETTINGS[name], args.rounds, secagg, ids[tag], args.idle))
            r = out[-1]["rounds"]
            print("  " + ", ".join(f"r{x['round']} {x['round_s']:.1f} s (compute {x['compute_s']:.2f} s)" for x in r),
                  file=sys.stderr, flush=True)
    finally:
        city.stop_all()
    print("\n| setting | SecAgg+ | round | round s (train + evaluate) | compute s | framework share |")
    print("|---|---|---:|---:|---:|---:|")
    for m in out:
        for r in m["rounds"]:
            print(f"| {m['setting'].rsplit('-', 1)[0]} | {'on' if m['secagg'] else 'off'} | {r['round']} | "
                  f"{r['round_s']:.1f} ({r['train_s']:.1f} + {r['evaluate_s']:.1f}) | {r['compute_s']:.2f} | "
                  f"{100 * r['framework_share']:.0f}% |")
    print("\nsteady state (rounds after the first):")
    for m in out:
        steady = m["rounds"][1:] or m["rounds"]
        rt = sum(r["round_s"] for r in steady) / len(steady)
        ct = sum(r["compute_s"] for r in steady) / len(steady)
        m["steady_round_s"], m["steady_compute_s"], m["steady_framework_share"] = rt, ct, 1 - ct / rt
        print(f"  {m['setting']}: round {rt:.2f} s, compute {ct:.2f} s, framework share {100 * (1 - ct / rt):.0f}%")
        m["steady_breakdown_s"] = {k: sum(r["breakdown_s"][k] for r in steady) / len(steady) for k in PARTS}
    print("\nwhere a steady-state round's time goes (s; critical path: per message, the node whose reply came last):")
    print("| part | " + " | ".join(m["setting"] for m in out) + " |")
    print("|---|" + "---:|" * len(out))
    for k in PARTS:
        print(f"| {PART_TITLES[k]} | " + " | ".join(f"{m['steady_breakdown_s'][k]:.2f}" for m in out) + " |")
    print("| **round** | " + " | ".join(f"**{m['steady_round_s']:.2f}**" for m in out) + " |")
    idle = [m for m in out if m["idle_core_share"]]
    if idle:
        print(f"\nidle: share of one core over {args.idle:.0f} s with the 3 nodes online and no run")
        print("| setting | SecAgg+ run after | coordinator | " + " | ".join(SITES) + " | all |")
        print("|---|---|---:|" + "---:|" * (len(SITES) + 1))
        for m in idle:
            sh = m["idle_core_share"]
            print(f"| {m['setting'].rsplit('-', 1)[0]} | {'on' if m['secagg'] else 'off'} | {sh['coordinator']:.3f} | "
                  + " | ".join(f"{sh[s]:.3f}" for s in SITES) + f" | {sum(sh.values()):.3f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
