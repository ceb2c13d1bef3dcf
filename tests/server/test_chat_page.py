"""The chat page at / in a real headless Chromium (Selenium), against the real server and model:
streamed answers, Stop aborting server-side, conversations kept across reloads, errors shown."""

import json
import os
import shutil
import time

import pytest

from .conftest import API_KEY, metric

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("SLIMSERVE_REQUIRE_BROWSER"):  # CI: the browser must be there
        raise RuntimeError("SLIMSERVE_REQUIRE_BROWSER is set but Chromium/ChromeDriver is missing")
    pytest.skip(
        "the chat page's browser tests need Chromium and ChromeDriver (Debian: apt-get install"
        " chromium chromium-driver; .ci/run installs them)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800"):  # fmt: skip
        opts.add_argument(arg)
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The page, fresh (local storage cleared), with the server's API key and greedy sampling."""
    browser.set_window_size(1280, 800)
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    settings = {"#set-api-key": API_KEY, "#set-temperature": "0", "#set-max-tokens": "24"}
    for sel, value in settings.items():
        el = browser.find_element(By.CSS_SELECTOR, sel)
        el.clear()
        el.send_keys(value)
    return browser


def wait(driver, cond, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: cond(d))


def answers(driver) -> list[str]:
    # Read in one script: the page re-renders while a reply streams (no stale elements).
    return driver.execute_script(
        "return [...document.querySelectorAll('.msg.assistant .bubble')].map(e => e.innerText)"
    )


def finished(driver) -> bool:
    return driver.execute_script(
        "return !!document.querySelector('.msg.assistant .meta')"
        " && !document.getElementById('send').hidden"
    )


def ask(driver, text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def test_streamed_answer_kept_across_reload(page, client):
    ref = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
        temperature=0,
    ).choices[0].message.content  # fmt: skip
    box = page.find_element(By.ID, "input")
    box.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.NULL, "line two")  # a new line
    assert box.get_attribute("value") == "line one\nline two"
    box.clear()
    ask(page, QUESTION)
    seen = set()  # the answer's text as it grows: more than one length before it ends
    while not finished(page):
        got = answers(page)
        if got and got[-1]:
            seen.add(got[-1])
        time.sleep(0.02)
    assert len(seen) >= 2, seen
    assert answers(page)[-1] == ref.strip()
    stats = page.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text
    assert "24 tokens" in stats and "tok/s" in stats and "first token" in stats, stats
    page.refresh()
    wait(page, lambda d: answers(d))
    assert answers(page) == [ref.strip()]
    names = page.find_elements(By.CSS_SELECTOR, "#conversations .name")
    assert [n.text for n in names] == [QUESTION[:40]]

    # Regenerate (greedy: the same answer again), then edit the question and send it again.
    page.find_element(By.CSS_SELECTOR, ".msg.assistant button.regenerate").click()
    wait(page, finished)
    assert answers(page) == [ref.strip()]
    page.find_element(By.CSS_SELECTOR, ".msg.user button.edit").click()
    edit = page.find_element(By.CSS_SELECTOR, ".msg.user textarea.edit")
    edit.clear()
    edit.send_keys("Name a colour.")
    page.find_element(By.CSS_SELECTOR, ".msg.user button.resend").click()
    wait(page, finished)
    users = [e.text for e in page.find_elements(By.CSS_SELECTOR, ".msg.user .bubble")]
    assert users == ["Name a colour."] and len(answers(page)) == 1
    assert answers(page)[0] and answers(page)[0] != ref.strip()


def test_stop_aborts_the_request_on_the_server(page, http):
    # A long answer, so that Stop comes while it streams. (clear() alone fires no input event:
    # the page kept its 24-token limit, and once the first token came in 20 ms the answer could
    # end before the click.)
    limit = page.find_element(By.ID, "set-max-tokens")
    limit.clear()
    limit.send_keys("2000")
    ask(page, "Count from 1 to 1000, separated by commas.")
    wait(page, lambda d: any(answers(d)))
    assert metric(http, "slimserve_num_requests_running") >= 1
    page.find_element(By.ID, "stop").click()
    wait(page, finished)
    deadline = time.monotonic() + 10
    while metric(http, "slimserve_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(http, "slimserve_num_requests_running") == 0
    assert "stopped" in page.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text


def test_server_errors_are_shown(page):
    # Longer than the model's context: the server's 400 message, not a blank answer.
    box = page.find_element(By.ID, "input")
    page.execute_script("arguments[0].value = arguments[1]", box, "word " * 20000)
    box.send_keys(Keys.ENTER)
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .error"))
    err = page.find_element(By.CSS_SELECTOR, ".msg.assistant .error").text
    assert "context length" in err, err
    # A wrong key: the server's 401 message.
    key = page.find_element(By.ID, "set-api-key")
    key.clear()
    key.send_keys("wrong")
    ask(page, "hello")
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .error")) == 2)
    errors = page.find_elements(By.CSS_SELECTOR, ".msg.assistant .error")
    assert "API key" in errors[-1].text
    # A full queue (the server's 503, as tests/server/test_load_and_shutdown.py provokes it):
    # the message and its Retry-After, read the way the page reads any failed response.
    shown = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const body = {error: {message: 'the server is at capacity', type: 'capacity_error'}};"
        "errorText(new Response(JSON.stringify(body),"
        " {status: 503, headers: {'Retry-After': '1'}})).then(done);"
    )
    assert shown == "the server is at capacity (retry after 1 s)"


def test_json_schema_setting_constrains_the_answer(page):
    schema = page.find_element(By.ID, "set-schema")
    schema.send_keys("{not json")
    assert "JSON schema" in page.find_element(By.ID, "settings-error").text
    ask(page, "Where is the Eiffel tower?")
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .error"))
    assert "not valid JSON" in page.find_element(By.CSS_SELECTOR, ".msg.assistant .error").text
    schema.clear()
    page.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
        schema, json.dumps({"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"], "additionalProperties": False}),
    )  # fmt: skip
    limit = page.find_element(By.ID, "set-max-tokens")
    limit.clear()
    limit.send_keys("64")
    ask(page, "Where is the Eiffel tower?")
    wait(page, lambda d: len(answers(d)) == 2 and finished(d))
    answer = json.loads(answers(page)[-1])
    assert set(answer) == {"city"} and isinstance(answer["city"], str)


def test_conversations_rename_delete_export(page):
    page.find_element(By.ID, "new-chat").click()
    page.find_element(By.ID, "new-chat").click()
    assert len(page.find_elements(By.CSS_SELECTOR, "#conversations li")) == 2
    page.find_element(By.CSS_SELECTOR, "#conversations li button.rename").click()
    alert = page.switch_to.alert
    alert.send_keys("Trip plans")
    alert.accept()
    names = [n.text for n in page.find_elements(By.CSS_SELECTOR, "#conversations .name")]
    assert names == ["Trip plans", "New chat"]
    exported = page.execute_script(
        "const s = JSON.parse(localStorage.getItem('slimserve.chat.v1'));"
        "return s.conversations.map(c => c.title)"
    )
    assert exported == ["Trip plans", "New chat"]
    page.find_element(By.CSS_SELECTOR, "#conversations li button.delete").click()
    names = [n.text for n in page.find_elements(By.CSS_SELECTOR, "#conversations .name")]
    assert names == ["New chat"]
    page.refresh()
    assert [n.text for n in page.find_elements(By.CSS_SELECTOR, "#conversations .name")] == names


def test_screenshots_desktop_and_phone(page, tmp_path):
    """Usable at phone width: the conversation list folds away and the composer fits. The
    screenshots go to $SLIMSERVE_SCREENSHOTS when set (docs/img/ keeps them)."""
    out = os.environ.get("SLIMSERVE_SCREENSHOTS") or str(tmp_path)
    limit = page.find_element(By.ID, "set-max-tokens")
    limit.clear()
    limit.send_keys("96")
    ask(page, "Write a Python function that adds two numbers.")
    wait(page, finished, timeout=120)
    page.find_element(By.CSS_SELECTOR, "#settings summary").click()  # folded for the picture
    for name, (w, h) in {"chat-desktop": (1280, 800), "chat-phone": (390, 844)}.items():
        page.set_window_size(w, h)
        time.sleep(0.3)
        width = page.execute_script("return document.documentElement.clientWidth")
        composer = page.find_element(By.ID, "composer").rect
        assert composer["x"] + composer["width"] <= width + 1
        sidebar = page.find_element(By.ID, "sidebar").rect
        if w < 700:
            assert sidebar["x"] + sidebar["width"] <= 1  # folded away
            page.find_element(By.ID, "toggle-sidebar").click()
            time.sleep(0.3)
            assert page.find_element(By.ID, "sidebar").rect["x"] >= 0
            page.find_element(By.ID, "close-sidebar").click()
            time.sleep(0.3)
            assert page.find_element(By.ID, "sidebar").rect["x"] < 0
        else:
            assert sidebar["x"] >= 0 and sidebar["width"] > 0
        path = os.path.join(out, f"{name}.png")
        assert page.save_screenshot(path) and os.path.getsize(path) > 10_000
