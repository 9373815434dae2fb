"""Shared by the browser tests: Debian's headless Chromium, driven by ``benchmarks/report_screenshot.py``.

``shot`` is that script loaded as a module (``find_chromium``, ``dump_dom``, ``screenshot``,
``short_run``); :func:`needs_chromium` is the module-level skip used when no ``chromium`` (or
``chromium-browser``) binary is on PATH (CI images may have none; ``apt-get install -y chromium``).
"""

import importlib.util
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("report_screenshot", ROOT / "benchmarks" / "report_screenshot.py")
shot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shot)


def needs_chromium(what: str):
    """``pytestmark`` that skips a browser test module, naming ``what`` needs the browser."""
    return pytest.mark.skipif(shot.find_chromium() is None,
                              reason=f"no chromium binary on PATH (apt-get install -y chromium); {what} needs one")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])
