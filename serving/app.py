"""The ``fl-serve`` HTTP API (FastAPI): predictions from a verified model package, on the department's node.

Endpoints
---------
``POST /predict``
    Records in the department's schema, as JSON ``{"records": [{column: value, ...}, ...]}``
    or a CSV body (``Content-Type: text/csv``). Answer: health, ``probability`` per record;
    traffic / utility, the ``forecast`` of the next steps after the last record, in the
    target's unit. A schema violation is answered 422 with ``field``, ``problem``, ``fix``.
``GET /model``
    The model card (provenance: run, strategy, rounds, sites, epsilon and delta, metrics);
    ``model``: ``global``, or ``personalised`` with ``personalised`` naming the node's file
    (``fl-serve --personalised``, :mod:`serving.personalised`).
``GET /metrics``
    Request counts by endpoint and status, records predicted, latency percentiles.
``GET /health``
    Liveness (no key needed): package, department, site.
``GET /docs``, ``GET /openapi.json``
    OpenAPI documentation (no key needed; it holds no record and no model).

Every endpoint but ``/health`` and the docs needs an API key (``X-API-Key: KEY`` or
``Authorization: Bearer KEY``): none given is 401, a wrong one 403. Request bodies are never
logged. No request body is answered 500: one the checks do not foresee (a library error while
reading it) is answered 422 ``records`` with the error's type. An unexpected error elsewhere is
answered 500 with its type only (a library message may quote a record); the server log gets
one line with its type and place, and its traceback only under ``fl-serve --debug``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from collections import defaultdict, deque

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi_offline import FastAPIOffline
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from serving.features import (UNFORESEEN_FIX, RequestError, SiteFeatures, error_place, for_json_records,
                              frame_from_csv, frame_from_records)
from serving.package import ModelPackage

log = logging.getLogger("cityfed.serve")

#: Most records one request may carry.
MAX_RECORDS = 10_000
#: Largest request body (bytes).
MAX_BODY = 20 * 1024 * 1024


class PredictRequest(BaseModel):
    """JSON body of ``POST /predict``."""

    records: list[dict] = Field(description="Records in the department's schema: one object per record, keys are the "
                                            "schema's column names (GET /model -> schema). Health: one probability "
                                            "per record. Traffic/utility: the site's consecutive records up to the "
                                            "last known step (at least the model's lookback); the answer is the next "
                                            "horizon steps.")


class Metrics:
    """Request counts and latencies (thread-safe; the last 10,000 latencies per endpoint)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=10_000))
        self.records = 0

    def add(self, endpoint: str, status: int, seconds: float, records: int = 0) -> None:  # noqa: D102
        with self._lock:
            self.counts[endpoint][str(status)] += 1
            self.latency[endpoint].append(seconds)
            self.records += records

    def snapshot(self) -> dict:  # noqa: D102
        with self._lock:
            out = {"uptime-seconds": round(time.time() - self.started, 3), "records-predicted": self.records,
                   "requests": {k: dict(v) for k, v in self.counts.items()}, "latency-ms": {}}
            for k, v in self.latency.items():
                a = np.asarray(v) * 1000
                out["latency-ms"][k] = {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
                                        "max": float(a.max()), "n": int(len(a))}
            return out


def _unprocessable(exc: RequestError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [{"field": exc.field, "problem": exc.problem, "fix": exc.fix}]})


def _records(body: bytes):
    """The ``records`` of a JSON body; :class:`RequestError` (field ``body`` or ``records``) when it is not one."""
    fix = "send {\"records\": [{column: value, ...}, ...]} with Content-Type application/json, or a CSV with " \
          "Content-Type text/csv"
    try:
        payload = json.loads(body or b"null")
    except RecursionError:
        raise RequestError("body", "JSON nested too deeply", "send {\"records\": [{column: value, ...}, ...]} whose "
                           "values are single numbers, texts, true/false or null (no lists or objects)") from None
    except json.JSONDecodeError as exc:  # its position only: the message would quote no value, but keep it short
        raise RequestError("body", f"not valid JSON (line {exc.lineno} column {exc.colno})", fix) from None
    except UnicodeDecodeError:
        raise RequestError("body", "not valid UTF-8 text", "send the body encoded as UTF-8: " + fix) from None
    except ValueError:  # an integer of more than 4300 digits (Python's limit)
        raise RequestError("body", "a number too large (more than 4300 digits)",
                           "send plausible values (GET /model -> schema gives units and ranges): " + fix) from None
    if not isinstance(payload, dict) or "records" not in payload:
        raise RequestError("records", "missing", "send {\"records\": [{column: value, ...}, ...]}")
    records = payload["records"]
    if isinstance(records, list) and len(records) > MAX_RECORDS:
        raise RequestError("records", f"{len(records)} records, more than {MAX_RECORDS}", "split the request")
    return records


def _internal(exc: BaseException, path: str, debug: bool) -> JSONResponse:
    """The answer to an error no check foresaw: 500 with its type; the log gets one line (type and place, never the
    message, which a library may have filled with a record's value), the traceback only with ``--debug``."""
    if debug:
        log.error("fl-serve: %s on %s", error_place(exc), path, exc_info=exc)
    else:
        log.error("fl-serve: %s on %s; run fl-serve with --debug for the traceback", error_place(exc), path)
    return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__}); see the server log"})


def build_app(package: ModelPackage, features: SiteFeatures, api_keys: list[str], *,
              debug: bool | None = None) -> FastAPI:
    """The FastAPI app serving ``package`` for ``features``' site.

    Parameters
    ----------
    package : ModelPackage
        A verified package (:func:`serving.package.load_package`).
    features : SiteFeatures
        The served site's validation and scaling (built from the node's own data).
    api_keys : list of str
        Accepted keys (at least one).
    debug : bool, optional
        Log the traceback of an unexpected error (default: ``$CITYFED_DEBUG`` is ``1``, as
        ``fl-serve --debug`` sets it); otherwise one line with its type and place.

    Returns
    -------
    FastAPI
    """
    if not api_keys or not all(api_keys):
        raise ValueError("fl-serve needs at least one non-empty API key")
    if package.department != features.department:
        raise ValueError(f"the package is a {package.department} model; the data given is {features.department}'s")
    from serving.package import schema_dict

    here = {k: v for k, v in schema_dict(features.schema).items() if k != "describe"}
    packaged = {k: v for k, v in package.schema.items() if k != "describe"}
    if here != packaged:
        diff = sorted(k for k in set(here) | set(packaged) if here.get(k) != packaged.get(k))
        raise ValueError(f"{package.path}/schema.json differs from this node's {features.department} schema in "
                         f"{diff}: the package was made by another cityfed version; serve it with that version, or "
                         "export the run again with this one")
    if debug is None:
        from privacy.safe_cli import DEBUG_ENV

        debug = os.environ.get(DEBUG_ENV) == "1"
    keys = [k.encode() for k in api_keys]
    metrics = Metrics()
    model = package.model
    lock = threading.Lock()  # one forward pass at a time (torch threads are the parallelism)
    card = package.card
    personalised = package.personalised
    which = "personalised model" if personalised else "model"
    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from files shipped in the
    # fastapi-offline package (FastAPI's own pages fetch them from a CDN: blank on an offline node)
    app = FastAPIOffline(title=f"cityfed {which}: {package.department} run {card.get('run-id')}, site {features.site}",
                  description="Predictions of a cityfed federated model on this department's node. Send records in the "
                              "department's schema; answers are in original units. Needs an API key "
                              "(X-API-Key header).", version=str(card.get("cityfed-version", "")))

    def require_key(request: Request) -> None:
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise HTTPException(401, "API key missing: send it as 'X-API-Key: KEY' (or 'Authorization: Bearer KEY')",
                                headers={"WWW-Authenticate": "Bearer"})
        if not any(hmac.compare_digest(given.encode(), k) for k in keys):
            raise HTTPException(403, "API key not accepted")

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - one log line, no traceback (a frame's values may be a record)
            response = _internal(exc, request.url.path, debug)
        path = request.url.path  # every other path is one key: a key per path grew /metrics without bound
        metrics.add(path if path in routes else "(other)", response.status_code, time.perf_counter() - t0,
                    int(response.headers.get("x-records", 0) or 0))
        return response

    @app.get("/health", summary="Liveness: the served package, department and site")
    def health() -> dict:
        return {"status": "ok", "department": package.department, "site": features.site,
                "run-id": card.get("run-id"), "manifest-sha256": package.manifest_sha256,
                "model": "personalised" if personalised else "global",
                **({"personalised-sha256": personalised["sha256"]} if personalised else {})}

    @app.get("/model", summary="The model card (provenance) and the schema of the records", dependencies=[Depends(require_key)])
    def model_card() -> dict:
        return {"card": card, "schema": package.schema, "model-config": package.model_config,
                "manifest-sha256": package.manifest_sha256, "site": features.site,
                "model": "personalised" if personalised else "global", "personalised": personalised}

    @app.get("/metrics", summary="Request counts, records predicted, latency percentiles", dependencies=[Depends(require_key)])
    def get_metrics() -> dict:
        return metrics.snapshot()

    @app.post("/predict", summary="Predict from records in the department's schema (JSON or CSV body)",
              dependencies=[Depends(require_key)],
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": PredictRequest.model_json_schema()},
                  "text/csv": {"schema": {"type": "string"}}}, "required": True}})
    async def predict(request: Request):
        too_big = RequestError("records", f"the body has more than {MAX_BODY} bytes", "send fewer records per request")
        declared = request.headers.get("content-length", "")
        if declared.strip().isdigit() and len(declared.strip()) <= 20 and int(declared) > MAX_BODY:
            return _unprocessable(too_big)  # answered before the body is read
        chunks, size = [], 0
        async for chunk in request.stream():  # read up to the limit, never the whole of a larger body
            size += len(chunk)
            if size > MAX_BODY:
                return _unprocessable(too_big)
            chunks.append(chunk)
        body = b"".join(chunks)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("", "application/json", "text/csv", "application/csv") and not ctype.endswith("+json"):
            return JSONResponse({"detail": [{"field": "content-type", "problem": f"{ctype[:60]!r} is not accepted",
                                             "fix": "send application/json ({\"records\": [...]}) or text/csv"}]},
                                status_code=415)
        try:
            try:
                csv = ctype in ("text/csv", "application/csv")
                if csv:
                    frame = frame_from_csv(body)
                else:
                    records = _records(body)
                    frame = frame_from_records(records)
                    features.check_fields(records)  # a field some records lack: refused, as a record alone is
                if len(frame) > MAX_RECORDS:
                    raise RequestError("records", f"{len(frame)} records, more than {MAX_RECORDS}", "split the request")
                try:
                    X, info = features.inputs(frame)
                except RequestError as exc:  # the adapters word fixes for a file: a JSON client sends fields and null
                    raise exc if csv else for_json_records(exc) from None
            except RequestError:
                raise
            except (ValueError, TypeError, ArithmeticError, LookupError, AttributeError, RecursionError) as exc:
                # a body the checks did not foresee: the client's fault or ours, never a 500 or a traceback
                log.warning("fl-serve: a request's records raised %s (answered 422)", error_place(exc))
                if debug:
                    log.warning("fl-serve: traceback (--debug)", exc_info=exc)
                raise RequestError("records", f"the records could not be read ({type(exc).__name__})",
                                   UNFORESEEN_FIX) from None
        except RequestError as exc:
            return _unprocessable(exc)
        with lock, torch.no_grad():
            out = model(torch.from_numpy(X)).numpy()
        answer = features.answer(out, info)
        return JSONResponse(answer, headers={"x-records": str(len(frame))})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # raised outside the middleware above
        return _internal(exc, request.url.path, debug)

    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.state.metrics = metrics
    return app
