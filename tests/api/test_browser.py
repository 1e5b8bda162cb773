"""Headless Chromium (Debian's, driven by Playwright) on the chat page: send a message, see the
answer stream in as text, see the rate-limit message once the free limit is spent."""
import os
import shutil

import pytest

from dllm.api.ratelimit import RateLimiter

CHROMIUM = os.environ.get("DLLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium not found at {CHROMIUM}: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        # bypass_csp: Playwright's wait_for_function needs eval, and the injection test below
        # should hold on textContent alone, without the page's CSP as a safety net
        pg = browser.new_page(bypass_csp=True)
        pg.set_default_timeout(90_000)
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        yield pg
        browser.close()
    assert not errors, errors


def send(page, text):
    page.fill("#prompt", text)
    page.click("#send")


def test_chat_page_streams_and_shows_rate_limit(page, make_server):
    # 2 free requests, then the bucket is empty for a minute; short answers keep the test quick
    s = make_server(rate_limit=RateLimiter(rate=1 / 60, burst=2), default_max_tokens=24)
    streamed = []
    page.on("response", lambda r: streamed.append(r.headers.get("content-type", ""))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(s.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'smollm2'")

    send(page, "Say hello to <b>bold</b> & <script>x</script>")
    page.wait_for_selector(".msg.assistant[data-done='1']")
    answer = page.text_content(".msg.assistant")
    assert answer.strip(), "empty answer"
    assert page.query_selector(".msg.user b") is None  # user text rendered as text, not markup
    assert "<b>bold</b>" in page.text_content(".msg.user")
    assert "tokens/s" in page.text_content("#tps")
    assert any(ct.startswith("text/event-stream") for ct in streamed)

    send(page, "And a second one?")
    page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='1']\").length === 2")
    assert page.is_hidden("#notice")

    send(page, "A third, over the limit")
    page.wait_for_selector("#notice:not([hidden])")
    notice = page.text_content("#notice")
    assert "Rate limit reached" in notice and "seconds" in notice
    assert len(page.query_selector_all(".msg.assistant")) == 2


def test_model_text_is_never_markup(page, make_server, monkeypatch):
    """Model output that looks like HTML stays text: the page uses textContent only."""
    from dllm.api import textgen

    async def fake_deltas(self):
        self.completion_tokens, self.finish_reason = 2, "stop"
        for piece in ['<img src=x onerror="window.pwned=1">', "<i>hi</i>"]:
            yield piece
    monkeypatch.setattr(textgen.TextStream, "deltas", fake_deltas)
    s = make_server()
    page.goto(s.url + "/")
    send(page, "anything")
    page.wait_for_selector(".msg.assistant[data-done='1']")
    assert page.text_content(".msg.assistant") == '<img src=x onerror="window.pwned=1"><i>hi</i>'
    assert page.query_selector(".msg.assistant img") is None and page.query_selector(".msg.assistant i") is None
    assert page.evaluate("window.pwned") is None
