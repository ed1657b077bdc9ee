"""The dashboard (``{base_path}/admin/``) in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium, against a gateway running as ``serve`` runs it (``run_live``: a sqlite
file, the admin token, real sockets) in front of a mock upstream speaking real HTTP.

What is asserted, as a user would see it: logging in with the admin token (a wrong one refused in the page, the
session held in an HttpOnly cookie the page cannot read); a chat request made during the test shown in flight
in the live view and then in the request log within 2 s, its attempts (a fallback) on its detail page; a key
created in the page, its secret shown once, working with the openai SDK, then disabled in the page and refused
(401); a route added in the page and answering; a provider tested from the page; usage and its CSV link; the
overview at 360 px without horizontal scroll; every form control labelled; dark mode; logging out; the page
under a base_path; and, over everything the module did, no console error and no request to another host.

One browser and one gateway per module (fixtures), tests in file order; every wait is a condition
(WebDriverWait), never a sleep. Screenshots of each page go to the module's temporary directory
(``dashboard-shots*``; the path is printed at the end of the module, ``-s`` shows it).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_live
from tests.mock_upstream import MockUpstream, Reply, chat_completion, stream_of, wait_until
from tests.pyz_support import missing_tool

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover (a test extra; the fixture says what is missing)
    webdriver = None  # type: ignore[assignment]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ADMIN = "adm-" + "b7" * 16
SEEN_WITHIN = 2.0  # seconds: the "appears in the live view and the request log within 2 s"
WAIT = 5.0  # seconds: anything else the page shows after an action
# What one test hands the next (file order, one browser and gateway); a test run alone makes what it needs.
KEPT: dict[str, str] = {}
ROUTES = [
    {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
    {"name": "chat", "steps": [{"provider": "up1", "model": "gpt-mock"}]},
    # The live request: the first step fails (500), the second streams and is held open by the test.
    {"name": "live", "steps": [{"provider": "up1", "model": "fail-500"}, {"provider": "up2", "model": "held"}]},
]


# -- harness ---------------------------------------------------------------------------------------------

class Page:
    """The browser on the dashboard of one gateway, and everything the browser logged so far."""

    def __init__(self, driver: Any, gw: RunningGateway, shots: Path, prefix: str = "") -> None:
        self.d = driver
        self.gw = gw
        self.base = f"{gw.url}{prefix}/admin/"
        self.shots = shots
        self.console: list[dict[str, Any]] = []  # browser log entries (console and network errors)
        self.urls: list[str] = []  # every URL the page asked for (Network.requestWillBeSent)
        self.hosts = {urlsplit(gw.url).netloc}  # where the page may send requests: the gateway it came from

    # -- logs
    def drain(self) -> None:
        self.console += self.d.get_log("browser")
        for entry in self.d.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self.urls.append(message["params"]["request"]["url"])

    def errors(self) -> list[dict[str, Any]]:
        self.drain()
        return [e for e in self.console if e["level"] == "SEVERE"]

    # -- waiting and finding
    def wait(self, cond: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
        def check(_: Any) -> Any:
            try:
                return cond()
            except StaleElementReferenceException:  # the page re-rendered under us: ask again
                return False

        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(check)
        except TimeoutException:
            self.shot(f"timeout-{uuid.uuid4().hex[:6]}")
            raise AssertionError(f"not within {timeout:g}s: {what or cond}; console: {self.errors()}") from None

    def find(self, css: str, root: Any = None) -> list[WebElement]:
        return list((root or self.d).find_elements(By.CSS_SELECTOR, css))

    def one(self, css: str, timeout: float = WAIT) -> WebElement:
        return self.wait(lambda: next(iter(e for e in self.find(css) if e.is_displayed()), None), timeout, css)

    def text(self, css: str) -> str:
        return " ".join(e.text for e in self.find(css))

    # -- moving around
    def open(self) -> None:
        self.d.get(self.base)

    def nav(self, name: str) -> None:
        """Click a link of the top bar (a real link: the hash route changes, the page does not reload)."""
        self.one(f'#nav a[href="#/{name}"]').click()
        self.wait(lambda: self.d.execute_script("return location.hash") == f"#/{name}"
                  and self.find(f'#nav a[href="#/{name}"][aria-current="page"]'), what=f"page {name}")

    def logged_in(self) -> bool:
        return bool(self.find("#nav")) and self.find("#nav")[0].is_displayed()

    def login(self, token: str = ADMIN) -> None:
        box = self.one("#login-token")
        box.clear()
        box.send_keys(token, Keys.ENTER)  # the form submits from the keyboard

    def ensure_logged_in(self) -> None:
        if not self.d.current_url.startswith(self.base):
            self.open()
        self.wait(lambda: self.logged_in() or self.find("#login-token"), what="the page")
        if not self.logged_in():
            self.login()
            self.wait(self.logged_in, what="logged in")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        return path

    def cdp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return self.d.execute_cdp_cmd(cmd, args or {})


def chrome() -> Any:
    """Headless Chromium with the console and network logs on; skipped (or failed under
    AT_GATEWAY_REQUIRE_TOOLS) when the browser or its driver is not installed."""
    if webdriver is None:
        missing_tool("selenium is not installed (pip install -e '.[test]')")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            missing_tool(f"{path} not found (apt-get install {package}; .ci/run installs it)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--no-first-run", "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-default-apps", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class Held:
    """The mock upstream's ``held`` model: a stream that stops after its first chunk until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, _: Any) -> Reply:
        return Reply(sse=stream_of("live", "view"), hold=self.release, hold_after=2)


@pytest.fixture(scope="module")
def upstream_mod() -> Iterator[MockUpstream]:
    mock = MockUpstream().start()
    mock.replies["gpt-mock"] = Reply(body=chat_completion("hi from the mock", model="gpt-mock"))
    mock.replies["fail-500"] = Reply(status=500, body={"error": {"message": "upstream broke", "type": "server_error"}})
    try:
        yield mock
    finally:
        mock.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream_mod: MockUpstream) -> Iterator[RunningGateway]:
    db = tmp_path_factory.mktemp("dashboard") / "gw.db"
    raw = base_config(upstream_mod.url, routes=ROUTES, store={"path": str(db)}, admin_token=ADMIN)
    with run_live(raw) as running:
        yield running


@pytest.fixture(scope="module")
def browser(gw: RunningGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    shots = tmp_path_factory.mktemp("dashboard-shots")
    driver = chrome()
    page = Page(driver, gw, shots)
    try:
        yield page
    finally:
        try:
            driver.get("about:blank")  # stop the polling before the gateway goes away
        finally:
            driver.quit()
        print(f"\ndashboard screenshots: {shots}")


@pytest.fixture
def page(browser: Page) -> Page:
    browser.ensure_logged_in()
    return browser


def sdk(gw: RunningGateway, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=10)


def admin_get(gw: RunningGateway, path: str) -> str:
    """An admin API read with the token (not through the page): to wait for what the page will show."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("GET", f"/admin/api/v1/{path}", headers={"authorization": f"Bearer {ADMIN}"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def hello(client: openai.OpenAI, model: str) -> Any:
    return client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "hi"}])


def counted(page: Page) -> int | None:
    """The overview's "Requests, last hour" card as a number (None until it shows one)."""
    text = page.text('[data-stat="requests"]').replace(",", "").strip()
    return int(text) if text.isdigit() else None


# -- tests -----------------------------------------------------------------------------------------------

def test_login_with_the_admin_token(browser: Page) -> None:
    page = browser
    page.open()
    page.one("#login-token")
    assert not page.logged_in()
    page.shot("login")

    page.login("adm-" + "0" * 32)
    page.wait(lambda: "not an admin token" in page.text("#login-error"), what="the refusal")
    refused = page.errors()  # the 401 of POST login, as the browser reports any failed request; nothing else
    assert refused and all(e["source"] == "network" and "/admin/login" in e["message"] and "401" in e["message"]
                           for e in refused), refused
    page.console.clear()

    page.login()
    page.wait(page.logged_in, what="the overview after login")
    assert page.d.execute_script("return location.hash") == "#/overview"
    assert "token0" in page.text("#actor")
    cookies = {c["name"]: c for c in page.d.get_cookies()}
    assert cookies["atg_session"]["httpOnly"] is True and cookies["atg_session"]["sameSite"] == "Strict"
    assert cookies["atg_csrf"]["httpOnly"] is False
    assert cookies["atg_session"]["path"] == "/admin/"
    seen_by_page = page.d.execute_script("return document.cookie")
    assert "atg_csrf=" in seen_by_page and "atg_session" not in seen_by_page
    assert not page.find("#login-token")


def test_a_request_shows_in_flight_then_in_the_request_log(page: Page, upstream_mod: MockUpstream) -> None:
    held = Held()
    upstream_mod.replies["held"] = held
    rid = f"dash-live-{uuid.uuid4().hex[:12]}"
    page.nav("overview")
    page.one("#chart-rps svg")
    page.wait(lambda: counted(page) is not None, what="the request count")
    before = counted(page) or 0
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            stream = sdk(page.gw).chat.completions.create(
                model="live", messages=[{"role": "user", "content": "hi"}], stream=True,
                extra_headers={"x-request-id": rid})
            result["text"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as exc:  # noqa: BLE001 (asserted below)
            result["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    try:
        row = page.wait(lambda: next(iter(page.find(f'#inflight tr[data-request-id="{rid}"]')), None),
                        SEEN_WITHIN, "the request in flight in the live view")
        assert "live" in row.text  # its route
        page.wait(lambda: page.text('[data-stat="in_flight"]') not in ("", "0", "–"), what="the in-flight count")
        page.shot("overview")
    finally:
        held.release.set()
        worker.join(10)
    assert result.get("text") == "liveview", result

    page.wait(lambda: not page.find(f'#inflight tr[data-request-id="{rid}"]'), SEEN_WITHIN, "gone from in flight")
    page.wait(lambda: (counted(page) or 0) >= before + 1, SEEN_WITHIN, "counted in the overview")
    page.wait(lambda: page.find('#top-route tr[data-name="live"]'), SEEN_WITHIN, "the route in the top table")

    page.nav("requests")
    row = page.wait(lambda: next(iter(page.find(f'#requests-list tr[data-request-id="{rid}"]')), None),
                    SEEN_WITHIN, "the request in the request log")
    assert "200" in row.text and "up2" in row.text
    page.shot("requests")

    row.find_element(By.CSS_SELECTOR, "a").click()  # its detail page: both attempts
    attempts = page.wait(lambda: [r.text for r in page.find("#attempts tbody tr")] or None, what="the attempts")
    assert len(attempts) == 2, attempts
    assert "up1" in attempts[0] and "500" in attempts[0]
    assert "up2" in attempts[1] and "answered" in attempts[1]
    page.shot("request-detail")

    # The log's filters: by route and status class, and one that matches nothing.
    page.d.get(f"{page.base}#/requests?route=live&status=2xx")
    page.wait(lambda: page.find(f'#requests-list tr[data-request-id="{rid}"]'), what="filtered by route and status")
    status = page.one("#rq-status")
    status.clear()
    status.send_keys("5xx", Keys.ENTER)
    page.wait(lambda: "No requests match" in page.text("#requests-list"), what="nothing with 5xx")


def new_key(page: Page, name: str, shot: bool = False) -> str:
    """A key created in the page (600 rpm, routes demo and chat): the secret its dialog shows once."""
    page.nav("keys")
    page.one("#new-key").click()
    page.one("#key-name").send_keys(name)
    page.one("#key-limit-rpm").send_keys("600")
    page.one("#key-routes").send_keys("demo, chat")
    page.one("dialog form button[type=submit]").click()
    secret = page.one("#new-secret").get_attribute("value")
    assert secret and secret.startswith("atg_")
    KEPT[name] = secret
    if shot:
        page.shot("key-secret")
    page.one("#copy-secret").click()
    page.wait(lambda: page.text("dialog [role=status]") != "", what="the copy button's answer")
    page.one("dialog .actions .btn.primary").click()  # Done
    return secret


def new_route(page: Page, name: str, provider: str, model: str) -> None:
    """A route of one step added in the page's form."""
    page.nav("routes")
    page.one("#new-route").click()
    page.one("#route-name").send_keys(name)
    step = page.one("#route-steps .step-row")
    Select(step.find_element(By.CSS_SELECTOR, '[data-field="provider"]')).select_by_value(provider)
    step.find_element(By.CSS_SELECTOR, '[data-field="model"]').send_keys(model)
    page.one("dialog form button[type=submit]").click()
    page.wait(lambda: page.find(f'#routes-list tr[data-name="{name}"]'), what=f"route {name} listed")


def test_a_key_made_in_the_page_works_and_disabled_is_refused(page: Page) -> None:
    secret = new_key(page, "browser key", shot=True)
    row = page.wait(lambda: next(iter(page.find('#keys-list tr[data-key-name="browser key"]')), None),
                    what="the new key listed")
    assert "active" in row.text and "rpm 600" in row.text
    assert secret not in page.d.page_source  # shown once: gone from the page with its dialog
    page.shot("keys")

    client = sdk(page.gw, secret)
    answer = hello(client, "demo")
    assert answer.http_response.status_code == 200

    row.find_element(By.CSS_SELECTOR, '[data-action="disable"]').click()
    page.wait(lambda: page.find('#keys-list tr[data-key-name="browser key"] [data-state="disabled"]'),
              what="the key disabled")

    def refused() -> bool:
        try:
            hello(client, "demo")
        except openai.AuthenticationError:
            return True
        return False

    assert wait_until(refused, WAIT), "a disabled key still answered"


def test_a_key_edited_rotated_and_revoked_in_the_page(page: Page) -> None:
    """The rest of a key's life from the page: enabled again, its limits and budget changed (PATCH), rotated (the
    new secret shown once works, the old one is refused), revoked (final)."""
    first = KEPT.get("browser key") or new_key(page, "browser key")  # (made by the test before, in file order)
    page.nav("keys")
    row_css = '#keys-list tr[data-key-name="browser key"]'
    page.one(row_css)
    if page.find(f'{row_css} [data-action="enable"]'):
        page.one(f'{row_css} [data-action="enable"]').click()
    page.wait(lambda: page.find(f'{row_css} [data-state="active"]'), what="enabled again")
    page.one(f'{row_css} [data-action="edit"]').click()
    page.one("#key-limit-tpd").send_keys("100000")
    page.one("#key-budget").send_keys("5")
    page.one("dialog form button[type=submit]").click()
    page.wait(lambda: "tpd 100k" in page.text(row_css) and "budget $5.00 / month" in page.text(row_css),
              what="the new limits listed")

    assert wait_until(lambda: _status(page.gw, first) == 200, WAIT), "the enabled key does not work"
    page.one(f'{row_css} [data-action="rotate"]').click()
    page.one("dialog .btn.danger").click()  # the confirmation
    fresh = page.one("#new-secret").get_attribute("value")
    assert fresh and fresh.startswith("atg_")
    page.one("dialog .actions .btn.primary").click()
    assert wait_until(lambda: _status(page.gw, fresh) == 200, WAIT), "the rotated secret does not work"
    assert _status(page.gw, first) == 401  # the old one stopped with it

    page.one(f'{row_css} [data-action="revoke"]').click()
    page.one("dialog .btn.danger").click()
    page.wait(lambda: page.find(f'{row_css} [data-state="revoked"]'), what="revoked")
    assert not page.find(f'{row_css} [data-action]')  # nothing left to do with a revoked key
    assert wait_until(lambda: _status(page.gw, fresh) == 401, WAIT), "a revoked key still answered"


def _status(gw: RunningGateway, key: str) -> int:
    try:
        return hello(sdk(gw, key), "demo").http_response.status_code
    except openai.APIStatusError as exc:
        return exc.status_code


def test_a_route_added_in_the_page_answers(page: Page) -> None:
    new_route(page, "browser-route", "echo", "echo-browser")
    row = page.wait(lambda: next(iter(page.find('#routes-list tr[data-name="browser-route"]')), None),
                    what="the new route listed")
    assert "database" in row.text and "echo-browser" in row.text
    assert "YAML" in page.text('#routes-list tr[data-name="demo"]')
    page.shot("routes")

    KEPT["routes"] = "browser-route"
    answer = hello(sdk(page.gw), "browser-route")
    assert answer.http_response.status_code == 200
    assert answer.headers["x-gateway-route"] == "browser-route"
    assert answer.headers["x-gateway-model"] == "echo-browser"


def test_a_provider_tested_from_the_page(page: Page) -> None:
    page.nav("providers")
    row = page.one('#providers-list tr[data-name="echo"]')
    assert "YAML" in row.text
    row.find_element(By.CSS_SELECTOR, '[data-action="test"]').click()
    page.one("dialog form button[type=submit]").click()
    result = page.wait(lambda: next(iter(page.find("#test-result [data-ok]")), None), what="the test's result")
    assert result.get_attribute("data-ok") == "true", result.text
    page.shot("provider-test")
    page.one("dialog .actions .btn:not(.primary)").click()  # Close
    page.wait(lambda: not page.find("dialog"), what="the dialog closed")
    page.shot("providers")


def test_a_provider_added_edited_and_deleted_in_the_page(page: Page, upstream_mod: MockUpstream) -> None:
    """A provider written as JSON in the page, used by a route edited in the page's form, then both deleted."""
    page.nav("providers")
    page.one("#new-provider").click()
    spec = {"name": "browser-up", "type": "openai", "base_url": upstream_mod.url, "api_key": "sk-browser-" + "k" * 20}
    box = page.one("#spec-json")
    box.clear()
    box.send_keys(json.dumps(spec))
    page.one("dialog form button[type=submit]").click()
    row = page.wait(lambda: next(iter(page.find('#providers-list tr[data-name="browser-up"]')), None),
                    what="the new provider listed")
    assert "database" in row.text
    assert spec["api_key"] not in page.d.page_source  # listed masked

    row.find_element(By.CSS_SELECTOR, '[data-action="edit"]').click()  # the secret comes back masked: kept
    box = page.one("#spec-json")
    shown = json.loads(box.get_attribute("value") or "{}")
    assert shown["api_key"] != spec["api_key"] and "…" in shown["api_key"]
    box.clear()
    box.send_keys(json.dumps({**shown, "retries": 1}))
    page.one("dialog form button[type=submit]").click()
    page.wait(lambda: not page.find("dialog"), what="the provider saved")

    if "browser-route" not in KEPT.get("routes", ""):  # (added by an earlier test, in file order)
        new_route(page, "browser-route", "echo", "echo-browser")
    page.nav("routes")  # that route moved to the new provider in the form
    page.one('#routes-list tr[data-name="browser-route"] [data-action="edit"]').click()
    step = page.one("#route-steps .step-row")
    Select(step.find_element(By.CSS_SELECTOR, '[data-field="provider"]')).select_by_value("browser-up")
    model = step.find_element(By.CSS_SELECTOR, '[data-field="model"]')
    model.clear()
    model.send_keys("gpt-mock")
    page.one("dialog form button[type=submit]").click()
    page.wait(lambda: "browser-up" in page.text('#routes-list tr[data-name="browser-route"]'), what="the route moved")

    def served_by() -> str | None:
        answer = hello(sdk(page.gw), "browser-route")
        return answer.headers.get("x-gateway-provider")

    assert wait_until(lambda: served_by() == "browser-up", WAIT)
    sent = [r for r in upstream_mod.received if r.json.get("model") == "gpt-mock"][-1]
    assert sent.headers["authorization"] == f"Bearer {spec['api_key']}"  # the masked secret was kept

    page.one('#routes-list tr[data-name="browser-route"] [data-action="delete"]').click()
    page.one("dialog .btn.danger").click()
    page.wait(lambda: not page.find('#routes-list tr[data-name="browser-route"]'), what="the route deleted")
    page.nav("providers")
    page.one('#providers-list tr[data-name="browser-up"] [data-action="delete"]').click()
    page.one("dialog .btn.danger").click()
    page.wait(lambda: not page.find('#providers-list tr[data-name="browser-up"]'), what="the provider deleted")
    with pytest.raises(openai.NotFoundError):
        hello(sdk(page.gw), "browser-route")


def test_usage_and_its_csv(page: Page) -> None:
    assert hello(sdk(page.gw), "demo").http_response.status_code == 200
    assert wait_until(lambda: "demo" in admin_get(page.gw, "usage?group_by=route"), WAIT)  # the store's batch
    page.nav("usage")
    page.one("#usage-by-route").click()
    page.one("#usage-form button[type=submit]").click()
    page.wait(lambda: page.find('#usage-list tr.total') and page.find('#usage-list td')
              and "demo" in page.text("#usage-list"), what="usage by route")
    page.shot("usage")
    href = page.one("#usage-csv").get_attribute("href") or ""
    assert urlsplit(href).path == "/admin/api/v1/usage" and "format=csv" in href
    got = page.d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(async r => done([r.status, r.headers.get('content-type'), await r.text()]))"
        ".catch(e => done(['error', String(e)]))", href)
    assert got[0] == 200 and got[1].startswith("text/csv"), got
    assert got[2].splitlines()[0].count(",") >= 2  # a header line


def test_every_page_is_labelled_and_keyboard_reachable(page: Page) -> None:
    """Every form control has a label (its own <label>, or aria-label) and every action is a real button or link."""
    unlabelled_js = ("return [...document.querySelectorAll('main input, main select, main textarea')]"
                     ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))"
                     ".map(e => e.id || e.outerHTML.slice(0, 80));")
    for name in ("overview", "keys", "providers", "routes", "requests", "usage"):
        page.nav(name)
        page.one("main h1")
        assert page.d.execute_script(unlabelled_js) == [], name
        clickable_divs = page.d.execute_script(
            "return [...document.querySelectorAll('main [onclick], main div[tabindex], main span[tabindex]')].length")
        assert clickable_divs == 0, name
    page.nav("keys")
    page.one("#new-key").click()  # a dialog: its controls labelled too, Escape closes it
    page.one("#key-name")
    assert page.d.execute_script(unlabelled_js.replace("main ", "dialog ")) == []
    assert page.d.switch_to.active_element.get_attribute("id") == "key-name"
    page.d.switch_to.active_element.send_keys(Keys.ESCAPE)
    page.wait(lambda: not page.find("dialog"), what="Escape closes the dialog")


def test_the_overview_fits_360px_and_reads_in_dark_mode(page: Page) -> None:
    page.nav("overview")
    page.one("#chart-latency svg")
    page.cdp("Emulation.setDeviceMetricsOverride", {"width": 360, "height": 780, "deviceScaleFactor": 1,
                                                    "mobile": True})
    try:
        page.wait(lambda: page.d.execute_script("return window.innerWidth") == 360, what="a 360 px viewport")
        for name in ("overview", "keys", "providers", "routes", "requests", "usage"):
            page.nav(name)
            page.one("main h1")
            if name == "overview":
                page.wait(lambda: int(page.one("#chart-rps svg").get_attribute("width") or 0) <= 360,
                          what="charts redrawn")
            widths = page.d.execute_script(
                "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert widths[0] <= widths[1], (name, widths)
            page.shot(f"{name}-360px")
    finally:
        page.cdp("Emulation.clearDeviceMetricsOverride")

    page.nav("overview")
    page.cdp("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        page.wait(lambda: page.d.execute_script(
            "return matchMedia('(prefers-color-scheme: dark)').matches"), what="dark mode")
        rgb = page.d.execute_script("return getComputedStyle(document.body).backgroundColor")
        channels = [int(c) for c in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3]]
        assert sum(channels) < 3 * 60, rgb  # a dark background (and, by the same variables, light text)
        page.shot("overview-dark")
    finally:
        page.cdp("Emulation.setEmulatedMedia", {"features": []})


def test_logout_ends_the_session(page: Page) -> None:
    page.one("#logout").click()
    page.one("#login-token")
    assert "logged out" in page.text("main")
    names = {c["name"] for c in page.d.get_cookies()}
    assert "atg_session" not in names and "atg_csrf" not in names
    page.d.get(f"{page.base}#/keys")  # a bookmark to a page: the login first, then the page asked for
    page.login()
    page.wait(lambda: page.d.execute_script("return location.hash") == "#/keys" and page.find("#keys-list table"),
              what="the page asked for, after login")


def test_the_page_works_under_a_base_path(browser: Page, upstream_mod: MockUpstream,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    db = tmp_path_factory.mktemp("dashboard-base") / "gw.db"
    raw = base_config(upstream_mod.url, routes=ROUTES[:1], store={"path": str(db)}, admin_token=ADMIN,
                      base_path="/llm")
    with run_live(raw) as other:
        page = Page(browser.d, other, browser.shots, prefix="/llm")
        page.open()
        page.login()
        page.wait(page.logged_in, what="logged in under /llm")
        page.one("#chart-rps svg")
        page.nav("routes")
        page.one('#routes-list tr[data-name="demo"]')
        page.shot("routes-under-base-path")
        page.d.get("about:blank")
        page.drain()
        browser.console += page.console
        asked = [u for u in page.urls if u.startswith(other.url)]
        assert asked and all(urlsplit(u).path.startswith("/llm/admin/") for u in asked), asked
        browser.urls += page.urls
        browser.hosts |= page.hosts


def test_no_console_errors_and_no_other_host(page: Page) -> None:
    """Over everything this module did (each page visited once more here): no console error, and every request
    the page made went to the gateway it was loaded from."""
    for name in ("overview", "keys", "providers", "routes", "requests", "usage"):
        page.nav(name)
        page.one("main h1")
    assert page.errors() == []
    foreign = [u for u in page.urls if urlsplit(u).scheme not in ("data", "about", "blob")
               and urlsplit(u).netloc not in page.hosts]
    assert page.urls and foreign == []
