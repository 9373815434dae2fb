"""The console's session cookie expires, cannot be forged or replayed forever, and can be ended.

Before: the cookie was one fixed HMAC of the admin token, valid for ever (until the token was
rotated), and there was no way to log out.
"""

import pytest
from fastapi.testclient import TestClient

from server import console


@pytest.fixture
def setup(tmp_path):
    sd = tmp_path / "state"
    (sd / "runs").mkdir(parents=True)
    token = console.load_token(sd)
    app = console.make_app(sd, sd / "runs", token=token, cache_s=0)
    return TestClient(app, base_url="http://127.0.0.1:8090"), token


def _login(c, token):
    r = c.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303
    return r


def test_cookie_expires_after_its_lifetime(setup, monkeypatch):
    c, token = setup
    now = [1_800_000_000.0]
    monkeypatch.setattr(console, "_now", lambda: now[0])
    r = _login(c, token)
    assert f"Max-Age={console.SESSION_TTL_S}" in r.headers["set-cookie"]
    assert c.get("/runs").status_code == 200
    now[0] += console.SESSION_TTL_S - 5
    assert c.get("/runs").status_code == 200
    now[0] += 10
    r = c.get("/runs")
    assert r.status_code == 401 and "Log in" in r.text


def test_two_logins_get_different_cookies_and_a_forged_one_is_refused(setup, monkeypatch):
    c, token = setup
    now = [1_800_000_000.0]
    monkeypatch.setattr(console, "_now", lambda: now[0])
    first = _login(c, token).cookies[console.COOKIE]
    now[0] += 2
    second = _login(c, token).cookies[console.COOKIE]
    assert first != second and token not in first
    issued, mac = second.split(".", 1)
    # a cookie dated later (to live longer) with the same MAC, or garbage, is refused
    for bad in (f"{int(issued) + 3600}.{mac}", "x", ".", f"{issued}.", f"{issued}.{'0' * len(mac)}", "1e9.abc",
                f"{int(now[0]) + 10_000}.{mac}"):
        c.cookies.set(console.COOKIE, bad, domain="127.0.0.1")
        assert c.get("/runs").status_code == 401, bad
        c.cookies.clear()


def test_logout_ends_the_session(setup):
    c, token = setup
    kept = _login(c, token).cookies[console.COOKIE]  # e.g. a copy left in another browser
    page = c.get("/runs").text
    assert 'action="/logout"' in page  # every page offers it
    r = c.post("/logout", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert console.COOKIE in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]
    assert c.get("/runs").status_code == 401
    c.cookies.set(console.COOKIE, kept, domain="127.0.0.1")
    assert c.get("/runs").status_code == 401  # sessions issued before the log-out are refused
    _login(c, token)
    assert c.get("/runs").status_code == 200  # a new login works at once


@pytest.mark.parametrize("value", ["99999999999999999999", "86401", "-1"])
def test_refresh_out_of_range_is_refused(tmp_path, value):
    from typer.testing import CliRunner

    from server.cli import app as server_app

    sd = tmp_path / "state"
    sd.mkdir()
    r = CliRunner().invoke(server_app, ["console", "--state-dir", str(sd), "--refresh", value])
    assert r.exit_code == 2 and "--refresh" in r.output, r.output
    assert not (sd / console.TOKEN_FILE).exists()  # refused before anything is written
