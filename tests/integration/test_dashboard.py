"""The dashboard over HTTP (Starlette's TestClient): login, CSRF, retries, the audit log, no secrets."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

USD = 1_000_000
TOKEN = "dashboard-test-token-0123456789"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def dashboard(services: Any, broker: Any) -> Iterator[TestClient]:
    """The dashboard app on the session's database and broker (its own engine, closed after)."""
    from workers.operators.dashboard.app import create_app
    from workers.settings import Settings

    settings = Settings(
        database_url=services.database_url, redis_url=services.redis_url, dashboard_token=TOKEN
    )
    with TestClient(create_app(settings, broker=broker), base_url="http://127.0.0.1") as client:
        yield client


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def login(client: TestClient, operator: str = "alice", token: str = TOKEN) -> Any:
    form = client.get("/login")
    return client.post(
        "/login",
        data={"csrf": csrf_of(form.text), "token": token, "operator": operator, "next": "/failures"},
        follow_redirects=False,
    )


def fail_a_subscribe(setup: Any, producer: Any, drain: Any, account: str = "late", key: str = "s1") -> None:
    """A subscribe for an account that does not exist yet: a permanent failure, dead-lettered."""
    setup(plans=[{"plan_id": "pro", "price_micros": 10 * USD}])
    producer.subscribe(account_id=account, plan_id="pro", idempotency_key=key)
    drain()


def test_every_page_needs_a_login_with_the_right_token(services, dashboard):
    for path in ("/", "/failures?actor=renew", "/messages/m1", "/accounts/a1", "/actions"):
        response = dashboard.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/login?next=")
    for path in ("/retry", "/messages/m1/resolve", "/messages/m1/replay", "/logout"):
        assert dashboard.post(path, data={"message_id": "m1"}).status_code == 403, path

    refused = login(dashboard, token="dashboard-test-token-wrong-guess")
    assert refused.status_code == 403 and "Wrong token" in refused.text
    assert dashboard.get("/", follow_redirects=False).status_code == 303
    assert login(dashboard, operator="  ").status_code == 400  # a name is required for the audit log

    accepted = login(dashboard)
    assert (accepted.status_code, accepted.headers["location"]) == (303, "/failures")
    cookie = accepted.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = dashboard.get("/")
    assert page.status_code == 200 and "alice" in page.text and "billing" in page.text
    assert "DEV mode" not in page.text

    # log out: POST with the CSRF token, then the pages want a login again
    assert dashboard.post("/logout", data={}).status_code == 403
    assert (
        dashboard.post("/logout", data={"csrf": csrf_of(page.text)}, follow_redirects=False).status_code
        == 303
    )
    assert dashboard.get("/", follow_redirects=False).status_code == 303


def test_a_retry_needs_the_csrf_token_then_applies_the_message_once_and_is_audited(
    services, db, setup, producer, drain, dashboard
):
    fail_a_subscribe(setup, producer, drain)
    (failure,) = db("SELECT message_id, status FROM failed_messages")
    message_id = failure["message_id"]
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])  # the cause is fixed
    assert login(dashboard, operator="alice").status_code == 303

    listed = dashboard.get("/failures", params={"actor": "subscribe", "error": "unknown_account"})
    assert message_id in listed.text and "1 dead failure matching" in listed.text
    shown = dashboard.get(f"/messages/{message_id}")
    assert "UnknownAccount" in shown.text and "late" in shown.text

    form = {"mode": "one", "message_id": message_id, "back": "/failures"}
    assert dashboard.post("/retry", data=form).status_code == 403
    assert dashboard.post("/retry", data={**form, "csrf": "forged"}).status_code == 403
    assert db("SELECT status FROM failed_messages") == [{"status": "dead"}]
    assert db("SELECT count(*) AS n FROM operator_actions") == [{"n": 0}]

    retried = dashboard.post("/retry", data={**form, "csrf": csrf_of(listed.text)}, follow_redirects=False)
    assert (retried.status_code, retried.headers["location"]) == (303, "/failures")
    after = dashboard.get("/failures")
    assert f"Retried message {message_id}" in after.text
    assert "Retried message" not in dashboard.get("/failures").text  # a flash shows once
    drain()

    assert db("SELECT status, last_retried_by FROM failed_messages") == [
        {"status": "retried", "last_retried_by": "alice"}
    ]
    assert db("SELECT operator, via, action, count FROM operator_actions") == [
        {"operator": "alice", "via": "dashboard", "action": "retry", "count": 1}
    ]
    assert db("SELECT status FROM idempotency_keys WHERE key = 's1'") == [{"status": "completed"}]
    assert db("SELECT balance_micros FROM accounts") == [{"balance_micros": 20 * USD}]
    detail = dashboard.get(f"/messages/{message_id}").text
    assert 'id="failure-status">retried<' in detail and 'id="key-status">completed<' in detail
    actions = dashboard.get("/actions").text
    assert "alice" in actions and "dashboard" in actions and message_id in actions


def test_retry_all_matching_has_a_dry_run_preview_and_skips_conflicts(
    services, db, setup, producer, drain, dashboard
):
    setup(
        accounts=[{"account_id": "a1", "balance_micros": 100 * USD}],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )
    producer.subscribe(account_id="late1", plan_id="pro", idempotency_key="s1")
    producer.subscribe(account_id="late2", plan_id="pro", idempotency_key="s2")
    producer.subscribe(account_id="a1", plan_id="pro", idempotency_key="c1")
    drain()
    producer.subscribe(account_id="a1", plan_id="other", idempotency_key="c1")  # a key conflict
    drain()
    login(dashboard)
    page = dashboard.get("/failures", params={"actor": "subscribe"})
    assert "2 dead failures matching these filters can be retried" in page.text
    assert "(1 more cannot" in page.text
    form = {"csrf": csrf_of(page.text), "actor": "subscribe", "back": "/failures?actor=subscribe"}

    preview = dashboard.post("/retry", data={**form, "mode": "preview"})
    assert "Dry run: 2 would be retried, 1 skipped. Nothing changed." in preview.text
    assert db("SELECT count(*) AS n FROM operator_actions") == [{"n": 0}]

    setup(
        accounts=[
            {"account_id": "late1", "balance_micros": 20 * USD},
            {"account_id": "late2", "balance_micros": 20 * USD},
        ]
    )
    done = dashboard.post("/retry", data={**form, "mode": "all"})
    assert "Retried 2, skipped 1." in done.text and "other arguments" in done.text
    drain()
    assert db("SELECT key, status FROM idempotency_keys WHERE key IN ('s1', 's2') ORDER BY key") == [
        {"key": "s1", "status": "completed"},
        {"key": "s2", "status": "completed"},
    ]
    (action,) = db("SELECT operator, via, action, count, target FROM operator_actions")
    assert (action["operator"], action["via"], action["action"], action["count"]) == (
        "alice",
        "dashboard",
        "retry_all",
        2,
    )
    assert '"actor": "subscribe"' in action["target"]

    bad = dashboard.get("/failures", params={"since": "yesterday"})
    assert bad.status_code == 400 and "neither a duration" in bad.text


def test_replay_needs_the_confirmation_box_and_resolve_a_note(
    services, db, setup, producer, drain, dashboard
):
    fail_a_subscribe(setup, producer, drain)
    message_id = db("SELECT message_id FROM failed_messages")[0]["message_id"]
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])
    login(dashboard, operator="bob")
    csrf = csrf_of(dashboard.get(f"/messages/{message_id}").text)

    unconfirmed = dashboard.post(
        f"/messages/{message_id}/replay", data={"csrf": csrf, "new_key": "s1-replay"}
    )
    assert "Not replayed: tick the box" in unconfirmed.text
    assert (
        dashboard.post(f"/messages/{message_id}/resolve", data={"csrf": csrf, "note": " "}).status_code == 200
    )
    assert db("SELECT count(*) AS n FROM operator_actions") == [{"n": 0}]

    replayed = dashboard.post(
        f"/messages/{message_id}/replay", data={"csrf": csrf, "new_key": "s1-replay", "confirm": "yes"}
    )
    assert f"Replayed message {message_id}" in replayed.text
    drain()
    assert db("SELECT status FROM idempotency_keys WHERE key = 's1-replay'") == [{"status": "completed"}]
    assert db("SELECT status, resolved_by FROM failed_messages") == [
        {"status": "resolved", "resolved_by": "bob"}
    ]
    again = dashboard.post(f"/messages/{message_id}/resolve", data={"csrf": csrf, "note": "done"})
    assert "already resolved" in again.text
    assert db("SELECT operator, via, action FROM operator_actions") == [
        {"operator": "bob", "via": "dashboard", "action": "replay"}
    ]


def test_no_page_shows_a_secret(services, db, setup, producer, drain, dashboard):
    from db import money
    from db.engine import make_engine, transaction
    from workers.clock import SystemClock

    setup(
        accounts=[
            {
                "account_id": "rich",
                "balance_micros": 100 * USD,
                "auto_top_up_threshold_micros": 1 * USD,
                "auto_top_up_amount_micros": 10 * USD,
                "payment_method_ref": "pm_secret_ref_4242",
            }
        ],
        plans=[{"plan_id": "pro", "price_micros": 10 * USD}],
    )

    async def issue_user_key() -> str:
        engine = make_engine(services.database_url, pool_size=1)
        try:
            async with transaction(engine) as conn:
                issued = await money.create_user_key(conn, account_id="rich", now=SystemClock().now())
                return issued.plaintext
        finally:
            await engine.dispose()

    plaintext = asyncio.run(issue_user_key())
    producer.subscribe(account_id="rich", plan_id="pro", idempotency_key="ok1")  # a managed key too
    producer.subscribe(account_id="rich", plan_id="missing", idempotency_key="bad1")  # a failure
    drain()
    hashes = [r["key_hash"] for r in db("SELECT key_hash FROM api_keys")]
    assert len(hashes) == 2
    (failure,) = db("SELECT message_id FROM failed_messages")
    secrets = [plaintext, *hashes, "pm_secret_ref_4242", TOKEN, "key_hash", "payment_method_ref"]

    pages = {"/login": dashboard.get("/login").text}
    login(dashboard)
    for path in ("/", "/failures", f"/messages/{failure['message_id']}", "/accounts/rich", "/actions"):
        response = dashboard.get(path)
        assert response.status_code == 200, path
        pages[path] = response.text
    assert "on file" in pages["/accounts/rich"]  # has_payment_method, not the reference
    assert plaintext.split(".")[0] in pages["/accounts/rich"]  # the public prefix is fine
    for path, html in pages.items():
        for secret in secrets:
            assert secret not in html, f"{path} shows {secret[:12]}…"


def test_security_headers_and_the_stylesheet(services, dashboard):
    for path in ("/login", "/static/dashboard.css", "/nope"):
        headers = dashboard.get(path).headers
        assert "default-src 'self'" in headers["content-security-policy"], path
        assert "script-src 'none'" in headers["content-security-policy"], path
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
    assert "<script" not in dashboard.get("/login").text
    assert dashboard.get("/static/dashboard.css").headers["content-type"].startswith("text/css")


def test_dev_mode_needs_no_login_shows_a_banner_and_answers_only_to_loopback_names(services, broker, db):
    from workers.operators.dashboard.app import create_app
    from workers.settings import Settings

    settings = Settings(
        database_url=services.database_url, redis_url=services.redis_url, dashboard_token=None
    )
    app = create_app(settings, broker=broker, dev=True, dev_operator="carol@laptop")
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        page = client.get("/")
        assert page.status_code == 200 and "DEV mode" in page.text and "carol@laptop" in page.text
        # still CSRF-checked
        assert client.post("/retry", data={"message_id": "m1"}).status_code == 403
        csrf = csrf_of(client.get("/failures").text)
        retried = client.post("/retry", data={"message_id": "m1", "csrf": csrf})
        assert "no such failed message" in retried.text
        assert db("SELECT operator, via FROM operator_actions") == [
            {"operator": "carol@laptop", "via": "dashboard"}
        ]
    with TestClient(app, base_url="http://evil.example") as client:
        assert client.get("/").status_code == 400  # DNS rebinding: not a loopback Host


def test_a_second_replay_of_one_failure_is_refused(services, db, setup, producer, drain, dashboard):
    fail_a_subscribe(setup, producer, drain)
    message_id = db("SELECT message_id FROM failed_messages")[0]["message_id"]
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])
    login(dashboard, operator="bob")
    csrf = csrf_of(dashboard.get(f"/messages/{message_id}").text)
    form = {"csrf": csrf, "confirm": "yes"}
    first = dashboard.post(f"/messages/{message_id}/replay", data={**form, "new_key": "k2"})
    assert f"Replayed message {message_id}" in first.text
    drain()
    page = dashboard.get(f"/messages/{message_id}").text
    assert "Replayed by bob" in page and "k2" in page
    second = dashboard.post(f"/messages/{message_id}/replay", data={**form, "new_key": "k3"})
    assert "Not replayed: message" in second.text and "already replayed" in second.text
    drain()
    assert db("SELECT key FROM idempotency_keys WHERE key IN ('k2', 'k3')") == [{"key": "k2"}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]
    assert db("SELECT count(*) AS n FROM operator_actions") == [{"n": 1}]


def test_the_queues_page_with_redis_down_says_so_and_still_shows_postgres(
    services, db, setup, producer, drain
):
    import socket

    from workers.broker import make_broker
    from workers.operators.dashboard.app import create_app
    from workers.settings import Settings

    fail_a_subscribe(setup, producer, drain)  # one dead failure, recorded in PostgreSQL
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(
        database_url=services.database_url, redis_url=f"redis://127.0.0.1:{port}/0", dashboard_token=TOKEN
    )
    broker = make_broker(settings)
    try:
        with TestClient(create_app(settings, broker=broker), base_url="http://127.0.0.1") as client:
            login(client)
            page = client.get("/")
            assert page.status_code == 503, page.text
            assert "Redis is unreachable" in page.text
            assert "Internal Server Error" not in page.text
            assert 'href="/static/dashboard.css"' in page.text  # the styled layout, not a bare error
            assert 'id="pg-dead-billing">1<' in page.text  # the failures PostgreSQL holds
            assert client.get("/failures").status_code == 200  # the PostgreSQL pages still work
    finally:
        broker.close()
