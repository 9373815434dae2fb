"""fl-serve's /docs renders on an offline node: Swagger UI comes from files served by fl-serve itself.

Found by a review of the docs followed literally (2026-12-07, L4): FastAPI's /docs page loads
Swagger UI's JavaScript and CSS from a CDN (cdn.jsdelivr.net), so on a node without internet (this
machine, and most department nodes) the page stayed blank.
"""

from __future__ import annotations

import httpx
import pytest

from chromium import needs_chromium, shot
from serve_helpers import served, synthetic_package

pytestmark = needs_chromium("fl-serve's /docs page")


def test_the_docs_page_renders_the_api_from_local_files(tmp_path):
    ctx, _feats, _pkg = served(synthetic_package(tmp_path, "health"), "Cleveland")
    with ctx as url:
        html = httpx.get(f"{url}/docs", timeout=30).text
        assert "cdn." not in html and "https://" not in html, html  # nothing fetched from elsewhere
        for path in ("/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/swagger-ui.css"):
            r = httpx.get(f"{url}{path}", timeout=30)
            assert r.status_code == 200 and len(r.content) > 10_000, path
        assert "cdn." not in httpx.get(f"{url}/redoc", timeout=30).text
        dom = shot.dump_url(f"{url}/docs")
    # Swagger UI ran: it read /openapi.json and drew an operation block per endpoint
    assert 'class="swagger-ui"' in dom and "opblock" in dom, dom[:2000]
    assert "/predict" in dom and "/model" in dom


def test_the_api_still_needs_its_key_next_to_the_open_docs(tmp_path):
    ctx, _feats, _pkg = served(synthetic_package(tmp_path, "health"), "Cleveland")
    with ctx as url:
        assert httpx.get(f"{url}/model", timeout=30).status_code == 401
        assert httpx.get(f"{url}/docs", timeout=30).status_code == 200
