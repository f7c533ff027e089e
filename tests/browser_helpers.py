"""Helpers for the Playwright browser tests (tests/test_browser.py): Chromium, pages, the chat DOM.

Playwright drives Debian's Chromium (browsers cannot be downloaded here). When Playwright or Chromium is
missing the tests fail under CI (env ``CI`` set) and skip locally, with the reason.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from .conftest import api_headers

try:
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright, expect

    PLAYWRIGHT_MISSING = ""
except ImportError as exc:  # pragma: no cover - depends on the environment
    PLAYWRIGHT_MISSING = f"playwright is not installed ({exc}); pip install -e '.[test]'"
    async_playwright = expect = None  # type: ignore[assignment]
    PlaywrightError = Exception  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Page

CHROMIUM = os.environ.get("TIDINGS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"

# Bounded waits (ms).
T_STATE = 15_000  # page connected / disconnected
T_RECONNECT = 30_000  # page reconnects on its own (backoff with jitter up to 8 s after a few tries)
T_MSG = 10_000  # a message shows up


def unavailable(reason: str) -> None:
    """Fail under CI, skip locally."""
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    if PLAYWRIGHT_MISSING:
        unavailable(PLAYWRIGHT_MISSING)
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as pw:
        try:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        except PlaywrightError as exc:
            unavailable(f"Chromium at {CHROMIUM} did not start: {exc}")
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def chromium_profile(user_data_dir: Path, **context_kw: Any) -> AsyncIterator[BrowserContext]:
    """Chromium with a profile on disk (Playwright's ``new_context`` contexts are incognito-like, and some
    APIs behave differently there: Push refuses to subscribe at once)."""
    if PLAYWRIGHT_MISSING:
        unavailable(PLAYWRIGHT_MISSING)
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as pw:
        try:
            ctx = await pw.chromium.launch_persistent_context(
                str(user_data_dir), executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000, **context_kw
            )
        except PlaywrightError as exc:
            unavailable(f"Chromium at {CHROMIUM} did not start: {exc}")
        try:
            yield ctx
        finally:
            await ctx.close()


# ------------------------------------------------------------------------------------------ page watching


@dataclass
class Watch:
    """Everything a page says that a test may want to assert on: console, page errors, dialogs."""

    console: list[tuple[str, str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    dialogs: list[tuple[str, str, str]] = field(default_factory=list)

    def attach(self, page: Page, name: str) -> Page:
        page.on("console", lambda m: self.console.append((name, m.type, m.text)))
        page.on("pageerror", lambda e: self.errors.append((name, str(e))))

        async def on_dialog(d: Any) -> None:
            self.dialogs.append((name, d.type, d.message))
            with contextlib.suppress(PlaywrightError):
                await d.dismiss()

        page.on("dialog", on_dialog)
        return page

    def csp_violations(self) -> list[tuple[str, str, str]]:
        return [c for c in self.console if "Content Security Policy" in c[2] or "Content-Security" in c[2]]

    def problems(self) -> list[Any]:
        """CSP violations, uncaught page errors and dialogs: none of these may happen in a healthy page."""
        return [*self.csp_violations(), *self.errors, *self.dialogs]


async def open_page(
    browser: Browser, url: str, watch: Watch, name: str, **context_kw: Any
) -> tuple[BrowserContext, Page]:
    """A page in its own context (own localStorage, own network switch), loaded and connected."""
    ctx = await browser.new_context(**context_kw)
    page = watch.attach(await ctx.new_page(), name)
    await page.goto(url)
    if context_kw.get("java_script_enabled", True):
        await wait_state(page, "connected")
    return ctx, page


async def wait_state(page: Page, state: str, timeout: float = T_STATE) -> None:
    await expect(page.locator(f'#status[data-state="{state}"]')).to_have_count(1, timeout=timeout)


async def wait_not_state(page: Page, state: str, timeout: float = T_STATE) -> None:
    await expect(page.locator(f'#status[data-state="{state}"]')).to_have_count(0, timeout=timeout)


async def set_hidden(page: Page, hidden: bool) -> None:
    """Emulate the tab being hidden or shown (headless tabs are always visible)."""
    await page.evaluate(
        """(hidden) => {
            const state = hidden ? 'hidden' : 'visible';
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => hidden});
            Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => state});
            document.dispatchEvent(new Event('visibilitychange'));
        }""",
        hidden,
    )


async def set_nick(page: Page, nick: str) -> None:
    await page.fill("#nick", nick)


async def send(page: Page, text: str) -> None:
    """Type a message and press Enter, as a person does."""
    await page.fill("#text", text)
    await page.press("#text", "Enter")
    await expect(page.locator("#text")).to_have_value("", timeout=5_000)


async def wait_body(page: Page, body: str, timeout: float = T_MSG) -> None:
    """Wait until a message with exactly this body is shown."""
    await page.wait_for_function(
        """(b) => Array.from(document.querySelectorAll('#messages .message .body'))
                      .some(e => e.textContent === b)""",
        arg=body,
        timeout=timeout,
    )


async def wait_count(page: Page, n: int, timeout: float = T_MSG) -> None:
    await expect(page.locator("#messages .message")).to_have_count(n, timeout=timeout)


async def messages(page: Page) -> list[dict[str, Any]]:
    """The shown messages, top to bottom: offset, body text, nick."""
    result: list[dict[str, Any]] = await page.evaluate(
        """() => Array.from(document.querySelectorAll('#messages .message')).map(e => ({
            offset: Number(e.dataset.offset),
            body: e.querySelector('.body') ? e.querySelector('.body').textContent : null,
            nick: e.dataset.nick}))"""
    )
    return result


def assert_once_in_order(msgs: list[dict[str, Any]]) -> None:
    offsets = [m["offset"] for m in msgs]
    assert all(a < b for a, b in itertools.pairwise(offsets)), f"not strictly increasing: {offsets}"


async def barrier(pages: list[Page], http: str, session: aiohttp.ClientSession, tag: str) -> str:
    """Publish a marker over the HTTP API and wait until every page shows it.

    Delivery is in offset order, so once the marker is shown everything before it has been delivered:
    counting then is exact, not a guess after a sleep.
    """
    body = f"-- barrier {tag} --"
    await api_publish(session, http, body, nick="barrier")
    for p in pages:
        await wait_body(p, body)
    return body


async def api_publish(
    session: aiohttp.ClientSession,
    http: str,
    body: str,
    nick: str = "api",
    channel: str = "chat:lobby",
    key: str | None = None,
) -> dict[str, Any]:
    headers = api_headers(key) if key else api_headers()
    async with session.post(
        f"{http}/api/publish",
        json={"channel": channel, "data": {"body": body, "nick": nick}},
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=10),
    ) as r:
        assert r.status == 200, await r.text()
        result: dict[str, Any] = await r.json()
        return result


async def api_history(
    session: aiohttp.ClientSession, http: str, key: str | None = None, channel: str = "chat:lobby"
) -> list[dict[str, Any]]:
    """The channel's history from the server (oldest first), as the page shows it: offset, body, nick."""
    headers = api_headers(key) if key else api_headers()
    async with session.get(
        f"{http}/api/channels/{channel}/history",
        params={"limit": "1000"},
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=10),
    ) as r:
        assert r.status == 200, await r.text()
        obj = await r.json()
    return [
        {"offset": p["offset"], "body": p["data"]["body"], "nick": p["data"].get("nick") or "anonymous"}
        for p in obj["publications"]
    ]


async def presence_count(session: aiohttp.ClientSession, http: str, channel: str = "chat:lobby") -> int:
    async with session.get(
        f"{http}/api/channels/{channel}/presence",
        headers=api_headers(),
        timeout=aiohttp.ClientTimeout(total=10),
    ) as r:
        assert r.status == 200, await r.text()
        obj = await r.json()
        return int(obj["count"])
