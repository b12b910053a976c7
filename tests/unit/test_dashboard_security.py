"""The dashboard's gatekeeping without services: the CLI's refusals, login, CSRF, headers, escaping."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from starlette.testclient import TestClient

from tests.conftest import ROOT

TOKEN = "unit-test-dashboard-token-42"


def dashboard_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_DASHBOARD_")}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "dashboard", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("--host", "0.0.0.0"), {}, "BILLING_DASHBOARD_TOKEN is not set"),
        ((), {}, "BILLING_DASHBOARD_TOKEN is not set"),
        (("--dev", "--host", "0.0.0.0"), {}, "--dev serves without a login"),
        (("--dev", "--host", "0.0.0.0"), {"BILLING_DASHBOARD_TOKEN": TOKEN}, "--dev serves without a login"),
        (("--host", "0.0.0.0"), {"BILLING_DASHBOARD_TOKEN": "short"}, "too short"),
    ],
)
def test_the_command_refuses_to_start_without_a_token_unless_dev_on_loopback(args, env, says):
    out = dashboard_cli(*args, **env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("billing: error:") and says in out.stderr
    assert out.stdout == ""


def _app(**overrides):
    from workers.operators.dashboard.app import create_app
    from workers.settings import Settings

    return create_app(Settings(**{"dashboard_token": TOKEN, **overrides}))


def test_create_app_refuses_a_missing_or_short_token():
    from tasks.errors import ConfigurationError
    from workers.operators.dashboard.app import create_app
    from workers.settings import Settings

    for token in (None, "", "x" * 15):
        with pytest.raises(ConfigurationError):
            create_app(Settings(dashboard_token=token))


def _login(client: TestClient, token: str = TOKEN, operator: str = "alice", csrf: str | None = None):
    page = client.get("/login")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found
    return client.post(
        "/login",
        data={"csrf": found.group(1) if csrf is None else csrf, "token": token, "operator": operator},
        follow_redirects=False,
    )


def test_login_checks_the_token_and_its_own_csrf_field_and_starts_a_fresh_session():
    client = TestClient(_app())
    assert client.get("/failures", follow_redirects=False).headers["location"] == "/login?next=%2Ffailures"
    assert client.post("/retry", data={"message_id": "m1"}).status_code == 403
    assert _login(client, token=TOKEN + "x").status_code == 403
    assert _login(client, csrf="").status_code == 403
    assert _login(client, csrf="guessed").status_code == 403
    before = client.cookies.get("billing_dashboard")
    done = _login(client)
    assert (done.status_code, done.headers["location"]) == (303, "/")
    cookie = done.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    assert client.cookies.get("billing_dashboard") != before
    # "next" only leads back into the dashboard
    page = client.get("/login", params={"next": "//evil.example/x"}, follow_redirects=False)
    assert page.headers["location"] == "/"


def test_a_cookie_from_another_token_or_secret_is_worthless():
    first = TestClient(_app())
    assert _login(first).status_code == 303
    stolen = first.cookies.get("billing_dashboard")
    assert stolen
    other = TestClient(_app(dashboard_token="another-token-of-enough-length"))
    other.cookies.set("billing_dashboard", stolen)
    assert other.get("/failures", follow_redirects=False).status_code == 303
    # with a fixed secret, rotating the token still ends old sessions
    a = TestClient(_app(dashboard_secret="s" * 32))
    assert _login(a).status_code == 303
    b = TestClient(_app(dashboard_secret="s" * 32, dashboard_token="rotated-token-of-enough-length"))
    b.cookies.set("billing_dashboard", a.cookies.get("billing_dashboard") or "")
    assert b.get("/failures", follow_redirects=False).status_code == 303


def test_cookie_secure_flag_and_security_headers():
    client = TestClient(_app(dashboard_cookie_secure=True), base_url="https://127.0.0.1")
    response = client.get("/login")
    assert "secure" in response.headers["set-cookie"].lower()
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


def test_names_are_escaped():
    client = TestClient(_app())
    assert _login(client, operator='<script>alert("x")</script>').status_code == 303
    page = client.get("/nope")  # the 404 page shows the operator in its header
    assert page.status_code == 404
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text
