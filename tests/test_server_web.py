"""The web chat page at /, driven in headless Chromium: it sends a message and shows the streamed reply, which
equals the reply the Python API gives. Set PYBITNET_SCREENSHOT to a path to also save the final screenshot
there (docs/web-chat.png is made that way)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pybitnet import SamplingParams
from test_server_helpers import running_server, tiny_llm

sync_api = pytest.importorskip("playwright.sync_api")

MESSAGE = "Tell me a story about the river."


def _chromium() -> str | None:
    """A Chromium to drive: the system's (Debian's chromium package) or one playwright downloaded."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    with sync_api.sync_playwright() as p:
        bundled = p.chromium.executable_path
    return bundled if bundled and Path(bundled).exists() else None


def test_web_page_streams_a_reply(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium: apt-get install chromium (or playwright install chromium)")
    llm = tiny_llm(max_num_seqs=2, max_model_len=256)
    expected = tiny_llm(max_num_seqs=1, max_model_len=256).chat(
        [{"role": "user", "content": MESSAGE}], SamplingParams(max_tokens=40, temperature=0)
    )[0]
    with running_server(llm) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 960, "height": 640})
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=30_000)
            sync_api.expect(page.locator("#model")).to_contain_text("tiny-bitnet")
            page.click("summary")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "40")
            page.fill("#input", MESSAGE)
            page.press("#input", "Enter")
            bubble = page.locator(".msg.assistant").last
            # seen mid-stream: some text shown while the reply is still streaming
            page.wait_for_function(
                "() => { const b = document.querySelector('.msg.assistant');"
                " return b && b.dataset.state === 'streaming' && Number(b.dataset.chunks) >= 1; }",
                timeout=30_000,
            )
            sync_api.expect(bubble).to_have_attribute("data-state", "done", timeout=60_000)
            assert int(bubble.get_attribute("data-chunks")) > 1
            assert bubble.locator(".text").text_content() == expected.text
            assert f"finish: {expected.finish_reason}" in bubble.locator(".meta").text_content()
            assert page.locator(".msg.user").text_content() == MESSAGE
            shot = tmp_path / "web-chat.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 0
            if target := os.environ.get("PYBITNET_SCREENSHOT"):
                shutil.copyfile(shot, target)
        finally:
            browser.close()
