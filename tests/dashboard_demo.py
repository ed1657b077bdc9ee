"""A demo of the dashboard: a gateway (as ``serve`` runs it) in front of a mock upstream, with traffic.

    .venv/bin/python tests/dashboard_demo.py                      # serves until Ctrl-C; prints the URL and token
    .venv/bin/python tests/dashboard_demo.py --screenshot docs/dashboard.png   # `make screenshot`

Charts show the last hour per minute, and a demo cannot wait an hour: the hour before now is written straight
into the gateway's database as the per-minute rollups the store's writer makes (``usage_minute``, the columns
of :mod:`at_gateway.store.usage`), shaped like a working day (a slow swell, a few errors and fallbacks, a
latency bump). On top of that, live requests from three client keys made through the admin API go through
the gateway for real: chats, streams that stay in flight for a moment, and a flaky upstream that makes the
route fall back. The database lives in a temporary directory, removed at exit.

With ``--screenshot``, headless Chromium logs in with the admin token, waits until the overview has drawn its
charts with requests in flight, saves the desktop overview as a PNG and exits.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: tests/ is sys.path[0], the package and tests/ live one up
    sys.path.insert(0, str(REPO))

from at_gateway.store.usage import (  # noqa: E402
    ROLLUP_COLUMNS,
    ROLLUP_COUNTS,
    ROLLUP_KEY,
    ROLLUP_LAT,
    ROLLUP_TTFT,
    ROLLUP_WIDTH,
    bucket_of,
)
from tests.conftest import RunningGateway, run_live  # noqa: E402
from tests.mock_upstream import MockUpstream, Reply, chat_completion, chunk  # noqa: E402

ADMIN = "adm-demo-" + "0123456789abcdef" * 2
GATEWAY_KEY = "demo-gateway-key"
KEYS = ("search-team", "support-bot", "batch-jobs")
PRICES = {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}, "claude-sonnet": {"input": "3", "output": "15"}}


def config(upstream: str, db: Path, port: int) -> dict[str, Any]:
    return {
        "api_key": GATEWAY_KEY,
        "port": port,
        "admin_token": ADMIN,
        "store": {"path": str(db)},
        "providers": [
            {"name": "primary", "type": "openai", "base_url": upstream, "api_key": "sk-demo-primary-key-0000"},
            {"name": "backup", "type": "openai", "base_url": upstream, "api_key": "sk-demo-backup-key-00000"},
            {"name": "echo", "type": "echo"},
        ],
        "routes": [
            {"name": "gpt-4o-mini", "steps": [
                {"provider": "primary", "model": "gpt-4o-mini", "timeout": 30, "price": PRICES["gpt-4o-mini"]},
                {"provider": "backup", "model": "gpt-4o-mini", "timeout": 30, "price": PRICES["gpt-4o-mini"]}]},
            {"name": "claude-sonnet", "steps": [
                {"provider": "primary", "model": "claude-sonnet", "timeout": 60, "price": PRICES["claude-sonnet"]}]},
            {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
        ],
    }


# -- the mock upstream -----------------------------------------------------------------------------------

def upstream() -> MockUpstream:
    """Answers with a little latency; gpt-4o-mini fails now and then at ``primary`` (the route falls back)."""
    mock = MockUpstream().start()
    rng = random.Random(7)

    def answer(rec: Any) -> Reply:
        body = rec.json
        model = body.get("model", "m")
        prompt = 20 + rng.randrange(400)
        completion = 10 + rng.randrange(200)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if model == "gpt-4o-mini" and rec.headers.get("authorization", "").endswith("primary-key-0000") \
                and rng.random() < 0.12:
            return Reply(status=503, body={"error": {"message": "overloaded", "type": "server_error"}},
                         delay=0.05 + rng.random() * 0.1)
        if body.get("stream"):
            words = ["Sure", ",", " here", " is", " a", " streamed", " answer", "."]
            events = [chunk("", role=True, model=model), *(chunk(w, model=model) for w in words),
                      chunk(finish="stop", model=model), chunk(choices=False, model=model, usage=usage)]
            return Reply(sse=events, delay=0.1 + rng.random() * 0.3, sse_delay=0.15 + rng.random() * 0.2)
        return Reply(body=chat_completion("Hello from the demo upstream.", model=model, usage=usage),
                     delay=0.05 + rng.random() * (0.8 if model == "claude-sonnet" else 0.35))

    mock.default = Reply(body=chat_completion())
    for model in ("gpt-4o-mini", "claude-sonnet"):
        mock.replies[model] = answer
    return mock


# -- an hour of history ----------------------------------------------------------------------------------

def backfill(db: Path, keys: dict[str, str], minutes: int, seed: int = 13) -> int:
    """The rollups of the ``minutes`` before the current one, as the store's writer would have made them."""
    rng = random.Random(seed)
    now_minute = int(time.time() // 60) * 60
    rows = []
    mix = [("gpt-4o-mini", "primary", "gpt-4o-mini", 0.62, 380.0),  # route, provider, model, share, p50 ms
           ("claude-sonnet", "primary", "claude-sonnet", 0.26, 950.0),
           ("demo", "echo", "echo-1", 0.12, 3.0)]
    key_share = [(keys[KEYS[0]], 0.5), (keys[KEYS[1]], 0.35), (keys[KEYS[2]], 0.15)]
    for i in range(minutes, 0, -1):
        minute = now_minute - i * 60
        phase = (minutes - i) / max(1, minutes)
        total = 40 + 55 * math.sin(phase * math.pi) ** 2 + rng.uniform(-6, 6)  # requests a minute: a swell
        slow = 1.0 + (0.9 if 0.55 < phase < 0.68 else 0.0)  # an upstream slow patch, twenty minutes ago or so
        for route, provider, model, share, latency in mix:
            for key_id, kshare in key_share:
                n = max(0, round(total * share * kshare + rng.uniform(-1, 1)))
                if not n:
                    continue
                price = PRICES.get(model)
                failed = 1 if route != "demo" and rng.random() < 0.18 else 0  # now and then a 5xx
                for status_class, count in ((2, n), (5, failed)):
                    if not count:
                        continue
                    counts = [0] * ROLLUP_WIDTH
                    c = dict.fromkeys(ROLLUP_COUNTS, 0)
                    c["requests"] = count
                    c["errors"] = count if status_class != 2 else 0
                    c["fallbacks"] = sum(rng.random() < 0.06 for _ in range(count)) if route == "gpt-4o-mini" else 0
                    if status_class == 2:
                        c["prompt_tokens"] = sum(rng.randrange(40, 900) for _ in range(count))
                        c["completion_tokens"] = sum(rng.randrange(20, 400) for _ in range(count))
                        if price is not None:
                            c["cost_nanousd"] = int(c["prompt_tokens"] * float(price["input"]) * 1000
                                                    + c["completion_tokens"] * float(price["output"]) * 1000)
                    for j, name in enumerate(ROLLUP_COUNTS):
                        counts[j] = c[name]
                    for _ in range(count):
                        ms = latency * slow * rng.lognormvariate(0, 0.45)
                        counts[ROLLUP_LAT + bucket_of(ms)] += 1
                        if route != "demo" and rng.random() < 0.4:  # the streamed share: time to first token
                            counts[ROLLUP_TTFT + bucket_of(ms * rng.uniform(0.2, 0.45))] += 1
                    rows.append((minute, route, provider, model, key_id, status_class, *counts))
    sql = (f"INSERT OR REPLACE INTO usage_minute ({', '.join((*ROLLUP_KEY, *ROLLUP_COLUMNS))}) "  # noqa: S608
           f"VALUES ({', '.join('?' * (len(ROLLUP_KEY) + len(ROLLUP_COLUMNS)))})")
    conn = sqlite3.connect(db, timeout=10)
    try:
        with conn:
            conn.executemany(sql, rows)
    finally:
        conn.close()
    return len(rows)


# -- live traffic ----------------------------------------------------------------------------------------

def admin_call(gw: RunningGateway, method: str, path: str, body: Any = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request(method, f"/admin/api/v1/{path}", json.dumps(body) if body is not None else None,
                     {"authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status >= 300:
            raise RuntimeError(f"admin {method} {path}: {r.status} {data[:300]!r}")
        return json.loads(data)
    finally:
        conn.close()


def traffic(gw: RunningGateway, secrets: list[str], stop: threading.Event, rate: float, seed: int) -> None:
    """One client: a request every ~1/rate seconds (chats, streams, the echo route), until ``stop``."""
    rng = random.Random(seed)
    while not stop.is_set():
        route = rng.choices(("gpt-4o-mini", "claude-sonnet", "demo"), (6, 3, 1))[0]
        stream = route != "demo" and rng.random() < 0.4
        body = {"model": route, "stream": stream, "messages": [{"role": "user", "content": "Tell me something."}]}
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body),
                         {"authorization": f"Bearer {rng.choice(secrets)}", "content-type": "application/json"})
            conn.getresponse().read()
        except OSError:
            pass  # the gateway is stopping
        finally:
            conn.close()
        stop.wait(rng.expovariate(rate))


# -- the screenshot --------------------------------------------------------------------------------------

def screenshot(gw: RunningGateway, out: Path, width: int = 1280, height: int = 1000) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"{gw.url}/admin/")
        wait = WebDriverWait(driver, 15, poll_frequency=0.1)
        wait.until(lambda d: d.find_elements(By.ID, "login-token"))
        driver.find_element(By.ID, "login-token").send_keys(ADMIN, Keys.ENTER)

        def ready(d: Any) -> bool:
            flying = d.find_elements(By.CSS_SELECTOR, "#inflight tbody tr[data-request-id]")
            drawn = d.find_elements(By.CSS_SELECTOR, "#chart-tokens svg path.line")
            tops = d.find_elements(By.CSS_SELECTOR, "#top-key tbody tr[data-name]")
            return bool(flying and drawn and len(tops) >= 3)

        wait.until(ready)
        driver.execute_script("document.activeElement && document.activeElement.blur()")
        tall = driver.execute_script("return document.documentElement.scrollHeight")  # the whole overview, no more
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": tall,
                                                                       "deviceScaleFactor": 1, "mobile": False})
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="the gateway's port (default: any free one)")
    parser.add_argument("--screenshot", type=Path, help="save the overview here as PNG and exit")
    parser.add_argument("--minutes", type=int, default=59, help="minutes of history to write (default 59)")
    parser.add_argument("--rate", type=float, default=4.0, help="live requests per second per client (default 4)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    mock = upstream()
    try:
        with tempfile.TemporaryDirectory(prefix="atg-demo-") as tmp:
            db = Path(tmp) / "demo.db"
            raw = config(mock.url, db, args.port)
            # First a short run that makes the client keys (through the admin API) and the hour of history, then
            # the demo itself on the same database: its key cache reads the keys at start, so none is refused.
            with run_live({**raw, "port": 0}) as setup:
                made = {name: admin_call(setup, "POST", "clients", {"name": name, "limits": {"rpm": 600}})
                        for name in KEYS}
            rows = backfill(db, {n: k["id"] for n, k in made.items()}, args.minutes)
            secrets = [k["key"] for k in made.values()]
            with run_live(raw) as gw:
                clients = [threading.Thread(target=traffic, args=(gw, secrets, stop, args.rate, i), daemon=True)
                           for i in range(3)]
                for t in clients:
                    t.start()
                try:
                    if args.screenshot is not None:
                        screenshot(gw, args.screenshot)
                        print(f"saved {args.screenshot}")
                    else:
                        print(f"dashboard: {gw.url}/admin/  admin token: {ADMIN}\n"
                              f"client keys: {', '.join(secrets)}\n({rows} rollup rows of history written; "
                              "Ctrl-C stops)", flush=True)
                        stop.wait()
                except KeyboardInterrupt:
                    pass
                finally:
                    stop.set()
                    for t in clients:
                        t.join(35)
    finally:
        mock.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
