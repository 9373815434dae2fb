"""``fl-serve`` load on loopback: throughput and p50/p99 latency, next to calling the model in-process (the floor).

One invocation exports a health model package (from ``--package``, or an untrained model of
the health department when none is given: the latency does not depend on the weights),
starts ``fl-serve`` for one hospital as a separate process on 127.0.0.1 (a free port) and
sends, over one keep-alive HTTP connection per client thread:

* ``single``: one record per request (the site's test records in turn);
* ``batch``: ``--batch`` records per request.

Each scenario runs ``--requests`` requests or ``--max-seconds``, whichever ends first (after
``--warmup`` requests), with ``--clients`` concurrent clients. Side by side, the same work in
this process without HTTP: ``model``: the forward pass alone on ready inputs (the floor);
``pipeline``: validation + scaling + forward (:class:`serving.features.SiteFeatures`), what
``/predict`` does besides HTTP and JSON.

    python benchmarks/serve_load.py [--requests 300] [--batch 64] [--clients 1 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_args, beside this script
from bench_args import finite_number, whole_number  # noqa: E402
BIN = Path(sys.executable).parent

import numpy as np  # noqa: E402


def _stats(lat: list[float], seconds: float, records: int) -> dict:
    a = np.asarray(lat) * 1000
    return {"requests": len(lat), "req/s": len(lat) / seconds, "records/s": records / seconds,
            "p50 ms": float(np.percentile(a, 50)), "p99 ms": float(np.percentile(a, 99))}


def in_process(feats, pkg, frames: list, n: int, max_s: float) -> dict:
    """Floor: the model alone on prepared inputs, and the whole pipeline without HTTP."""
    import torch

    out = {}
    inputs = [feats.inputs(f)[0] for f in frames]
    for name, fn in (("model", lambda k: pkg.model(torch.from_numpy(inputs[k % len(inputs)]))),
                     ("pipeline", lambda k: pkg.model(torch.from_numpy(feats.inputs(frames[k % len(frames)])[0])))):
        lat, t0 = [], time.perf_counter()
        with torch.no_grad():
            for k in range(n):
                t = time.perf_counter()
                fn(k)
                lat.append(time.perf_counter() - t)
                if time.perf_counter() - t0 > max_s:
                    break
        out[name] = _stats(lat, time.perf_counter() - t0, len(lat) * len(frames[0]))
    return out


def over_http(url: str, key: str, bodies: list[dict], n: int, clients: int, max_s: float, warmup: int) -> dict:
    """``n`` POST /predict requests spread over ``clients`` threads (one keep-alive connection each)."""
    import httpx

    lat: list[float] = []
    errors = []
    lock = threading.Lock()
    count = iter(range(n))
    stop = time.perf_counter() + max_s

    def worker():
        with httpx.Client(headers={"X-API-Key": key}, timeout=60) as c:
            for k in range(warmup):
                c.post(f"{url}/predict", json=bodies[k % len(bodies)])
            while time.perf_counter() < stop:
                with lock:
                    k = next(count, None)
                if k is None:
                    return
                t = time.perf_counter()
                r = c.post(f"{url}/predict", json=bodies[k % len(bodies)])
                dt = time.perf_counter() - t
                with lock:
                    (lat.append(dt) if r.status_code == 200 else errors.append(r.status_code))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = _stats(lat, time.perf_counter() - t0, len(lat) * len(bodies[0]["records"]))
    s["errors"] = len(errors)
    return s


def main() -> None:
    """Parse the arguments (bad ones: exit 2 with the option, the value and a fix) and run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, help="A health package folder (default: export an untrained model)")
    ap.add_argument("--site", default="Cleveland", help="The hospital served (a health site)")
    ap.add_argument("--requests", type=whole_number(1, "300"), default=300, help="Requests per scenario (upper bound)")
    ap.add_argument("--max-seconds", type=finite_number(0, "30", inclusive=False, unit="of seconds "), default=30.0, help="Time limit per scenario")
    ap.add_argument("--batch", type=whole_number(1, "64"), default=64, help="Records per batch request")
    ap.add_argument("--clients", type=whole_number(1, "4"), nargs="+", default=[1, 4], help="Concurrent clients")
    ap.add_argument("--warmup", type=whole_number(0, "5"), default=5)
    ap.add_argument("--json", type=Path, help="Write the figures here")
    args = ap.parse_args()
    if args.package is not None and not args.package.is_dir():
        what = "not found" if not args.package.exists() else "not a folder"
        ap.error(f"--package {args.package}: {what}; fix: give a health package folder (fl-sim export-model RUN -o DIR), "
                 "or leave --package out to export an untrained model")
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        ap.error(f"--json {args.json}: {'a folder' if args.json.is_dir() else 'its folder does not exist'}; fix: give a "
                 "file path in an existing folder")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import pandas as pd

    from serve_helpers import synthetic_run
    from serving.cli import free_port
    from serving.features import SiteError, SiteFeatures
    from serving.package import PackageError, export_package, load_package

    try:
        feats = SiteFeatures("health", args.site)
    except SiteError as exc:
        ap.error(str(exc))
    pkg_dir = args.package
    if pkg_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="cityfed-serve-bench-"))
        export_package(synthetic_run(tmp / "run", "health"), tmp / "pkg", sites=[])
        pkg_dir = tmp / "pkg"
    try:
        pkg = load_package(pkg_dir)
    except PackageError as exc:
        ap.error(f"--package {pkg_dir}: {exc}")
    if pkg.department != "health":
        ap.error(f"--package {pkg_dir}: a {pkg.department} package; fix: give a health package (this benchmark "
                 "serves one hospital), or leave --package out")
    test = feats.test_records()
    cols = [c.name for c in feats.schema.columns if c.name in test.columns and c.name not in ("num", "id")]
    recs = json.loads(test[cols].to_json(orient="records"))
    singles = [{"records": [r]} for r in recs]
    batches = [{"records": [recs[(k + j) % len(recs)] for j in range(args.batch)]} for k in range(0, len(recs), 7)]

    key = "bench-" + os.urandom(16).hex()
    port = free_port()
    env = {**os.environ, "CITYFED_SERVE_API_KEY": key, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(BIN / "fl-serve"), str(pkg_dir), "--site", args.site, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    results = {"site": args.site, "batch": args.batch, "requests": args.requests, "max-seconds": args.max_seconds,
               "cpus": os.cpu_count(), "torch-threads": 1, "rows": []}
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"fl-serve did not start: {proc.stderr.read()[-2000:] if proc.poll() is not None else 'timeout'}")
            time.sleep(0.2)
        for name, bodies in (("single", singles), ("batch", batches)):
            frames = [pd.DataFrame(b["records"]) for b in bodies]
            floor = in_process(feats, pkg, frames, args.requests, args.max_seconds)
            for where, s in floor.items():
                results["rows"].append({"scenario": name, "path": f"in-process {where}", "clients": 1, **s})
            for c in args.clients:
                s = over_http(url, key, bodies, args.requests, c, args.max_seconds, args.warmup)
                results["rows"].append({"scenario": name, "path": "HTTP fl-serve", "clients": c, **s})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    head = f"{'scenario':8} {'path':22} {'clients':>7} {'requests':>8} {'req/s':>9} {'records/s':>10} {'p50 ms':>8} {'p99 ms':>8}"
    print(head)
    for r in results["rows"]:
        print(f"{r['scenario']:8} {r['path']:22} {r['clients']:>7} {r['requests']:>8} {r['req/s']:>9.1f} "
              f"{r['records/s']:>10.1f} {r['p50 ms']:>8.2f} {r['p99 ms']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
