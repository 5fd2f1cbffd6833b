"""The web chat page at /, driven in headless Chromium: it sends a message and shows the streamed reply, which
equals the reply the Python API gives; for a model without a chat template it completes the text instead. Set
PYBITNET_SCREENSHOT to a path to also save the chat screenshot there (docs/web-chat.png is made that way)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pybitnet import LLM, SamplingParams
from test_engine_helpers import model_dir
from test_server_helpers import MODEL, running_server, tiny_llm

sync_api = pytest.importorskip("playwright.sync_api")

MESSAGE = "Tell me a story about the river."
GREEDY_40 = SamplingParams(max_tokens=40, temperature=0)


def _chromium() -> str | None:
    """A Chromium to drive: the system's (Debian's chromium package) or one playwright downloaded."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    with sync_api.sync_playwright() as p:
        bundled = p.chromium.executable_path
    return bundled if bundled and Path(bundled).exists() else None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _chromium()
    if path is None:
        pytest.skip("no Chromium: apt-get install chromium (or playwright install chromium)")
    return path


def _without_chat_template(tmp_path: Path) -> LLM:
    target = tmp_path / "no-template"
    shutil.copytree(model_dir(MODEL), target)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    (target / "chat_template.jinja").unlink(missing_ok=True)
    return LLM(target, device="cpu", seed=0)


def _send_and_wait(page, url: str) -> object:
    """Open the page, send MESSAGE greedily, wait for the whole streamed reply; the reply's bubble."""
    page.goto(url + "/")
    sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=30_000)
    page.click("summary")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    page.fill("#input", MESSAGE)
    page.press("#input", "Enter")
    bubble = page.locator(".msg.assistant").last
    sync_api.expect(bubble).to_have_attribute("data-state", "done", timeout=60_000)
    assert int(bubble.get_attribute("data-chunks")) > 1  # rendered piece by piece, as the chunks arrived
    assert page.locator(".msg.user").text_content() == MESSAGE
    return bubble


def test_web_page_streams_a_chat_reply(chromium, tmp_path):
    llm = tiny_llm(max_num_seqs=2, max_model_len=256)
    expected = tiny_llm(max_num_seqs=1, max_model_len=256).chat(
        [{"role": "user", "content": MESSAGE}], GREEDY_40
    )
    with running_server(llm) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 960, "height": 640})
            bubble = _send_and_wait(page, server.url)
            sync_api.expect(page.locator("#model")).to_contain_text("tiny-bitnet")
            assert bubble.locator(".text").text_content() == expected[0].text
            assert f"finish: {expected[0].finish_reason}" in bubble.locator(".meta").text_content()
            shot = tmp_path / "web-chat.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 0
            if target := os.environ.get("PYBITNET_SCREENSHOT"):
                shutil.copyfile(shot, target)
        finally:
            browser.close()


def test_web_page_completes_text_for_a_model_without_chat_template(chromium, tmp_path):
    llm = _without_chat_template(tmp_path)
    expected = llm.generate([MESSAGE], GREEDY_40)[0]
    with running_server(llm) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            bubble = _send_and_wait(page, server.url)
            sync_api.expect(page.locator("#model")).to_contain_text("completion mode")
            assert bubble.locator(".text").text_content() == expected.text
        finally:
            browser.close()
