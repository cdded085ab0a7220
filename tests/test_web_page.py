"""The web page at GET /, driven in a real headless Chromium as a user would: its caption and chat
answers stream in and equal the library's, token for token; API keys, bad files and big images."""

from __future__ import annotations

import base64
import io
import shutil

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

import blip2
from checkpoints import full_checkpoint
from test_server import NAME, png, running

GREEDY = dict(num_beams=1, max_new_tokens=30)  # the page's defaults: temperature 0, 30 tokens, 1 beam

# Records every text the last assistant bubble shows, in order, into window.seenTexts.
WATCH_ANSWER = """
window.seenTexts = [];
new MutationObserver(() => {
  const all = document.querySelectorAll('#messages .msg.assistant');
  const text = all.length ? all[all.length - 1].textContent : '';
  if (text && window.seenTexts[window.seenTexts.length - 1] !== text) window.seenTexts.push(text);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""

# Replaces the page's fetch of /v1/chat/completions (arguments[0] says how it answers): "stall" sends
# one piece of text and waits, "error" sends one piece then an error event, "offline" fails to connect.
FAKE_ANSWERS = """
const how = arguments[0];
window.realFetch = window.realFetch || window.fetch;
window.fetch = (url, init) => {
  if (!String(url).endsWith('/v1/chat/completions')) return window.realFetch(url, init);
  if (how === 'offline') return Promise.reject(new TypeError('Failed to fetch'));
  const events = ['{"choices": [{"index": 0, "delta": {"content": "Hel"}}]}'];
  if (how === 'error') events.push('{"error": {"message": "generation failed: boom"}}', '[DONE]');
  const body = new ReadableStream({start(c) {
    for (const e of events) c.enqueue(new TextEncoder().encode(`data: ${e}\\n\\n`));
    init.signal.addEventListener('abort', () => c.error(new DOMException('stopped', 'AbortError')));
  }});
  return Promise.resolve(new Response(body, {headers: {'Content-Type': 'text/event-stream'}}));
};
"""


@pytest.fixture(scope="module")
def model(ckpt_root):
    # Room for three turns of 30-token answers (the tiny default of 64 positions holds one). Random
    # tiny models mostly repeat one token whatever the prompt; with this seed a caption turn kept in
    # the history, or a lost turn, changes the answers the test compares.
    path, _ = full_checkpoint(ckpt_root / "web-opt", "opt", seed=72, max_position_embeddings=160)
    model = blip2.load(path)
    yield model
    model.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("needs the chromium and chromedriver binaries (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    yield driver
    driver.quit()


def until(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def text_of(driver, selector: str) -> str:
    return driver.execute_script("return document.querySelector(arguments[0]).textContent", selector)


def bubbles(driver) -> list[list[str]]:
    """[class, text] of each bubble in #messages, in order."""
    return driver.execute_script(
        "return [...document.getElementById('messages').children].map(m => [m.className, m.textContent])")


def idle(driver) -> bool:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"


def open_page(driver, base: str, wait_for_model=True) -> None:
    driver.get(f"{base}/")
    if wait_for_model:
        until(driver, lambda: text_of(driver, "#model") == NAME)


def choose(driver, path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))


def click_and_wait(driver, button_id: str) -> str:
    """Click, wait for the request to end; the last assistant bubble's text."""
    driver.find_element(By.ID, button_id).click()
    until(driver, lambda: idle(driver))
    assert text_of(driver, "#error") == ""
    kind, text = bubbles(driver)[-1]
    assert kind.split()[:2] == ["msg", "assistant"]
    return text


def caption_when_ready(driver) -> str:
    until(driver, lambda: driver.find_element(By.ID, "preview").get_attribute("src"))
    return click_and_wait(driver, "caption")


def ask(driver, question: str) -> str:
    driver.find_element(By.ID, "prompt").send_keys(question)
    return click_and_wait(driver, "send")


def test_caption_and_chat_stream_the_librarys_answers(browser, model, tmp_path):
    image = png(11, size=(60, 44))
    (tmp_path / "photo.png").write_bytes(image)
    with running(model) as base:
        open_page(browser, base)
        choose(browser, tmp_path / "photo.png")
        browser.execute_script(WATCH_ANSWER)
        caption = caption_when_ready(browser)
        assert caption == model.caption(image, **GREEDY)
        seen = browser.execute_script("return window.seenTexts")
        assert len(seen) > 1 and seen[-1] == caption, seen  # it grew in steps, not all at once
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen

        # captions are not part of the chat's history
        q1, q2 = "what is in the picture?", "and what colour is it?"
        a1 = ask(browser, q1)
        assert a1 == model.chat(image, [{"role": "user", "content": q1}], **GREEDY)
        browser.find_element(By.ID, "prompt").send_keys(q2, Keys.ENTER)  # Enter sends too
        until(browser, lambda: idle(browser) and len(bubbles(browser)) == 6)
        history = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
        assert bubbles(browser)[-1] == ["msg assistant", model.chat(image, history, **GREEDY)]
        assert [b[0] for b in bubbles(browser)] == ["msg user", "msg assistant"] * 3

        browser.find_element(By.ID, "reset").click()  # a new conversation keeps the image
        assert bubbles(browser) == []
        assert ask(browser, q2) == model.chat(image, [{"role": "user", "content": q2}], **GREEDY)


def test_a_server_with_an_api_key_needs_it_in_the_settings(browser, model, tmp_path):
    image = png(12)
    (tmp_path / "photo.png").write_bytes(image)
    with running(model, api_key="k") as base:
        open_page(browser, base, wait_for_model=False)
        until(browser, lambda: "API key" in text_of(browser, "#error"))
        choose(browser, tmp_path / "photo.png")
        until(browser, lambda: browser.find_element(By.ID, "preview").get_attribute("src"))
        browser.find_element(By.ID, "caption").click()
        until(browser, lambda: idle(browser) and "API key" in text_of(browser, "#error"))
        assert browser.find_element(By.ID, "error").is_displayed()

        settings = browser.find_element(By.ID, "settings")
        if not settings.get_attribute("open"):
            settings.find_element(By.TAG_NAME, "summary").click()
        browser.find_element(By.ID, "api-key").send_keys("k")
        assert click_and_wait(browser, "caption") == model.caption(image, **GREEDY)
        until(browser, lambda: text_of(browser, "#model") == NAME)


def test_bad_files_show_an_error_and_big_images_are_scaled_down(browser, model, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "broken.png").write_bytes(png(13)[:40])
    big = Image.new("RGB", (1600, 1200), (200, 60, 30))
    big.paste((20, 90, 220), (400, 300, 1200, 900))
    big.save(tmp_path / "big.png")
    with running(model) as base:
        open_page(browser, base)
        for bad in ("notes.txt", "broken.png"):
            choose(browser, tmp_path / bad)
            until(browser, lambda: f"{bad} is not an image" in text_of(browser, "#error"))
            assert browser.find_element(By.ID, "error").is_displayed() and idle(browser)

        choose(browser, tmp_path / "big.png")
        until(browser, lambda: text_of(browser, "#error") == "" and "JPEG" in text_of(browser, "#image-info"))
        sent = browser.find_element(By.ID, "preview").get_attribute("src")
        assert sent.startswith("data:image/jpeg;base64,")
        jpeg = base64.b64decode(sent.partition(",")[2])
        assert Image.open(io.BytesIO(jpeg)).size == (1024, 768)
        assert caption_when_ready(browser) == model.caption(jpeg, **GREEDY)


def test_stop_keeps_the_partial_answer_and_failures_leave_the_page_usable(browser, model, tmp_path):
    image = png(14)
    (tmp_path / "photo.png").write_bytes(image)
    with running(model) as base:
        open_page(browser, base)
        choose(browser, tmp_path / "photo.png")
        until(browser, lambda: browser.find_element(By.ID, "preview").get_attribute("src"))
        browser.execute_script(FAKE_ANSWERS, "stall")
        browser.find_element(By.ID, "prompt").send_keys("hi", Keys.ENTER)
        until(browser, lambda: bubbles(browser)[-1][1] == "Hel")
        assert not idle(browser)
        browser.find_element(By.ID, "stop").click()
        until(browser, lambda: idle(browser))
        assert bubbles(browser) == [["msg user", "hi"], ["msg assistant stopped", "Hel"]]

        for how, message in (("error", "generation failed: boom"), ("offline", "Network error: Failed to fetch")):
            browser.execute_script(FAKE_ANSWERS, how)
            browser.find_element(By.ID, "prompt").send_keys("why?", Keys.ENTER)
            until(browser, lambda: idle(browser) and text_of(browser, "#error") == message)
            assert bubbles(browser)[-1] == ["msg user failed", "why?"]
            assert browser.find_element(By.ID, "prompt").get_attribute("value") == "why?"  # given back
            browser.find_element(By.ID, "prompt").clear()

        browser.execute_script("window.fetch = window.realFetch")
        history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"},
                   {"role": "user", "content": "why?"}]
        assert ask(browser, "why?") == model.chat(image, history, **GREEDY)  # failed turns are not sent
