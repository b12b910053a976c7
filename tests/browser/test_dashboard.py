"""The dashboard in a real browser: headless Chromium (Debian's) driven by Selenium.

``billing dashboard`` runs as a subprocess on the test services; the
session's in-process worker processes what it enqueues.  Screenshots of each
page land in ``test-artifacts/dashboard/`` (gitignored).

Without ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` the test skips,
unless ``BILLING_REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "test-artifacts" / "dashboard"
TOKEN = "browser-test-dashboard-token-7f3a9c"
USD = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium through chromedriver (both from Debian), quit after the test."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        why = (
            f"{' and '.join(missing)} missing: install Debian's chromium and chromium-driver "
            "(`make browser`, or `apt-get install -y --no-install-recommends chromium chromium-driver` as root)"
        )
        if os.environ.get("BILLING_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " (BILLING_REQUIRE_BROWSER=1)")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(10)  # find_element waits for the page that a click loads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard_url(services: Any, tmp_path: Path) -> Iterator[str]:
    """``billing dashboard`` as a real process on a free port (terminated and reaped after)."""
    port = _free_port()
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "dashboard", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "BILLING_DASHBOARD_TOKEN": TOKEN},  # the services' BILLING_* URLs too
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/login", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the dashboard did not start:\n{(tmp_path / 'dashboard.log').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _shot(driver: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SHOTS / f"{name}.png"))


def test_an_operator_logs_in_finds_a_failure_retries_it_and_sees_it_processed(
    services, db, setup, producer, drain, browser, dashboard_url
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def arrive(path_end: str) -> None:
        WebDriverWait(browser, 15).until(ec.url_matches(re.escape(path_end) + "$"))

    # a subscribe for an account that does not exist yet fails for good...
    setup(plans=[{"plan_id": "pro", "price_micros": 10 * USD}])
    producer.subscribe(account_id="late", plan_id="pro", idempotency_key="s1")
    drain()
    (failure,) = db("SELECT message_id, status FROM failed_messages")
    message_id = failure["message_id"]
    assert failure["status"] == "dead"
    # ...until the account exists
    setup(accounts=[{"account_id": "late", "balance_micros": 30 * USD}])

    browser.get(f"{dashboard_url}/failures")  # not logged in: the login page
    assert "/login" in browser.current_url
    _shot(browser, "01-login")
    browser.find_element(By.ID, "operator").send_keys("alice")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    arrive("/failures")  # back where it was going

    browser.get(f"{dashboard_url}/")
    assert "Queues" in browser.find_element(By.TAG_NAME, "h1").text
    assert "billing.payments" in browser.page_source
    _shot(browser, "02-queues")

    browser.get(f"{dashboard_url}/failures?actor=subscribe")
    row = browser.find_element(By.ID, f"failure-{message_id}")
    assert "unknown_account" in row.text and "dead" in row.text
    _shot(browser, "03-failures")
    row.find_element(By.CSS_SELECTOR, "button.retry-one").click()
    arrive("/failures?actor=subscribe")  # redirected back, with a flash message
    flash = browser.find_element(By.CSS_SELECTOR, ".flash.ok").text
    assert f"Retried message {message_id}" in flash
    _shot(browser, "04-failures-after-retry")

    drain()  # the session's worker applies it
    assert db("SELECT status FROM idempotency_keys WHERE key = 's1'") == [{"status": "completed"}]
    assert db("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'subscription_charge'") == [{"n": 1}]
    assert db("SELECT balance_micros FROM accounts WHERE id = 'late'") == [{"balance_micros": 20 * USD}]

    browser.get(f"{dashboard_url}/messages/{message_id}")
    assert browser.find_element(By.ID, "failure-status").text == "retried"
    assert browser.find_element(By.ID, "key-status").text == "completed"
    assert '"outcome": "subscribed"' in browser.page_source.replace("&quot;", '"')
    _shot(browser, "05-message")

    browser.find_element(By.LINK_TEXT, "late").click()
    arrive("/accounts/late")
    assert "Account late" in browser.find_element(By.TAG_NAME, "h1").text
    assert "20.00 USD" in browser.find_element(By.ID, "balance").text
    assert "subscription_charge" in browser.page_source
    _shot(browser, "06-account")

    browser.find_element(By.LINK_TEXT, "Audit log").click()
    arrive("/actions")
    log = browser.find_element(By.TAG_NAME, "table").text
    assert "alice" in log and "dashboard" in log and "retry" in log
    _shot(browser, "07-actions")
    assert db("SELECT operator, via, action FROM operator_actions") == [
        {"operator": "alice", "via": "dashboard", "action": "retry"}
    ]
