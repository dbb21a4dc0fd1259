"""The dashboard at `/` in a real headless browser: Debian's chromium driven by Playwright, against two
`clusterctl join` processes on 127.0.0.1 (one serving the HTTP API). The browser is the system's; Playwright's
own browser downloads are never used.

The run leaves a screenshot of the dashboard after a streamed chat under tmp_path and in test-artifacts/.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from checkpoints import deepen
from cluster_nodes import ROOT, NodeProcess, free_port, member_names, wait_for
from conftest import FIXTURES, TEST_TOKEN

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # the dev extra is not installed
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
MODEL = "llama32"  # its tokenizer_config.json has a chat template
NAMES = ("alpha", "beta")

pytestmark = [
    pytest.mark.slow,  # a browser and two nodes: make test-slow (CI runs it)
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="needs the playwright Python package (pip install playwright)"),
]


def http(port: int, path: str, key: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            body = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """alpha (2 GiB, serves the API) and beta (1 GiB, joins through --peer); one chat has placed the model."""
    work = tmp_path_factory.mktemp("dashboard")
    model = deepen(FIXTURES / MODEL, work / MODEL, 6)
    alpha = NodeProcess("alpha", work, memory=2, mdns=False, api_port=free_port())
    beta = NodeProcess("beta", work, memory=1, mdns=False, peers=[alpha.address])
    nodes = [alpha, beta]
    try:
        for n in nodes:
            n.wait_ready()
        wait_for(lambda: all(member_names(n) == set(NAMES) for n in nodes), 30, "the nodes to meet")
        with alpha.client() as c:
            *_, last = c.chat(str(model), [{"role": "user", "content": "Hello"}], max_tokens=4)
        assert last.finish_reason is not None
        yield alpha
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def layers_held(status: dict[str, Any]) -> dict[str, str]:
    """What each node's row should list: "llama32 [0, 4)", as the page writes it."""
    return {
        n["name"]: "; ".join(f"{s['model_id']} [{s['layers'][0]}, {s['layers'][1]})" for s in n["shards"])
        for n in status["nodes"]
    }


def test_without_a_key_the_page_asks_for_one(cluster, page: Page):
    port = cluster.api_port
    assert http(port, "/")[0] == 200  # the page itself is public
    status, body = http(port, "/api/status")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert http(port, "/api/status", key="wrong")[0] == 401

    page.goto(f"http://127.0.0.1:{port}/")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("tr[data-node]")).to_have_count(0)
    # a wrong key: the form comes back with the server's message
    page.fill("#key-input", "not-the-token")
    page.click("#key-save")
    expect(page.locator("#key-error")).to_contain_text("not authorised")
    expect(page.locator("#key-form")).to_be_visible()
    # the right one: the nodes show
    page.fill("#key-input", TEST_TOKEN)
    page.click("#key-save")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("tr[data-node]")).to_have_count(2)


def test_nodes_layers_and_a_streamed_chat(cluster, page: Page, tmp_path):
    port = cluster.api_port
    _, status = http(port, "/api/status", key=TEST_TOKEN)
    held = layers_held(status)
    assert all(held[name] for name in NAMES), held  # the first chat spread the model over both nodes

    page.goto(f"http://127.0.0.1:{port}/#key={TEST_TOKEN}")
    for name in NAMES:
        row = page.locator(f'tr[data-node="{name}"]')
        expect(row).to_be_visible()
        expect(row.locator("td[data-layers]")).to_have_attribute("data-layers", held[name])
        expect(row.locator("td[data-layers]")).to_contain_text(held[name])
    assert "key=" not in page.url  # the token left the address bar
    expect(page.locator(f'[data-plan="{MODEL}"] [data-shard]')).to_have_count(2)
    expect(page.locator("#chat-model")).to_have_value(MODEL)
    requests_before = int(page.locator(f'[data-model="{MODEL}"] [data-stat="requests"]').inner_text())

    # record every text the answer showed, to tell a stream from one late block of text. Each mutation record keeps
    # the text node it added, so pieces the page rendered in one task (a browser starved of CPU on a busy machine
    # reads several events at once) still count one by one
    page.evaluate(
        """() => {
          window.seen = [];
          new MutationObserver((records) => {
            for (const r of records) {
              const el = r.target.nodeType === Node.TEXT_NODE ? r.target.parentElement : r.target;
              if (!el || !el.matches('#chat-output .msg.assistant .text')) continue;
              const shown = r.type === 'characterData' ? r.target.data
                : [...r.addedNodes].map((n) => n.textContent).join('');
              window.seen.push([performance.now(), shown.length]);
            }
          }).observe(document.getElementById('chat-output'),
                     {childList: true, subtree: true, characterData: true});
        }"""
    )
    page.fill("#chat-max-tokens", "64")  # the random model never ends by itself
    page.fill("#chat-input", "Tell me about the river.")
    page.click("#chat-send")
    answer = page.locator("#chat-output .msg.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=45_000)
    text = answer.locator(".text").inner_text()
    assert text.strip(), "no text arrived"
    seen: list[list[float]] = page.evaluate("window.seen")
    lengths = sorted({int(n) for _, n in seen if n > 0})
    assert len(lengths) >= 2, f"the answer arrived in one piece: {seen}"
    assert lengths[-1] == len(answer.locator(".text").text_content() or "")
    first = min(t for t, n in seen if n > 0)
    last = min(t for t, n in seen if n == lengths[-1])
    print(f"answer shown in {len(lengths)} pieces over {last - first:.0f} ms")
    expect(answer.locator(".meta")).to_contain_text("finish:")

    # the speed of that request reaches the model's card
    card = page.locator(f'[data-model="{MODEL}"]')
    expect(card.locator('[data-stat="requests"]')).to_have_text(str(requests_before + 1), timeout=10_000)
    assert float(card.locator('[data-stat="decode_tok_s"]').inner_text()) > 0
    assert float(card.locator('[data-stat="ttft_ms"]').inner_text()) > 0
    # and where its decode steps went: each node's shard, its wait and its engine time per token
    split = card.locator(f'[data-split="{MODEL}"] [data-shard-time]')
    expect(split).to_have_count(2)
    layers = {n["name"]: [s["layers"] for s in n["shards"] if s["model_id"] == MODEL][0] for n in status["nodes"]}
    for name in NAMES:
        first, end = layers[name]
        expect(card.locator(f'[data-shard-time="{name}"]')).to_contain_text(f"{name} [{first}, {end}) ")
    assert all(" ms (engine " in text for text in split.all_inner_texts())

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "dashboard.png")
    print(f"dashboard screenshot: {shot} (copy: {ARTIFACTS / 'dashboard.png'})")


def test_a_chat_error_is_shown(cluster, page: Page):
    page.goto(f"http://127.0.0.1:{cluster.api_port}/#key={TEST_TOKEN}")
    expect(page.locator("tr[data-node]")).to_have_count(2)
    page.fill("#chat-model", "no-such-model")
    page.fill("#chat-input", "Hello?")
    page.click("#chat-send")
    error = page.locator("#chat-output .msg.error")
    expect(error).to_contain_text("no-such-model", timeout=20_000)
    expect(page.locator("#chat-send")).to_be_enabled()


def test_a_thinking_models_reasoning_is_folded_apart_from_its_answer(cluster, page: Page, tmp_path):
    """The scripted thinking model (tests/scripted_model.py) answers with a <think> block, then text; the page
    shows the block's text under "thinking", folded once the answer starts, and the answer alone as the message.
    Reference: the script itself."""
    from scripted_model import scripted

    model = scripted(tmp_path / "thinker", ["<think>", "\nRivers run", " downhill.\n", "</think>", "\n\n", "Yes."])
    page.goto(f"http://127.0.0.1:{cluster.api_port}/#key={TEST_TOKEN}")
    expect(page.locator("tr[data-node]")).to_have_count(2)
    page.fill("#chat-model", str(model))
    page.fill("#chat-input", "Do rivers run downhill?")
    page.click("#chat-send")
    answer = page.locator("#chat-output .msg.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    expect(answer.locator(".text")).to_have_text("Yes.")
    expect(answer.locator(".thinking .thought")).to_have_text("Rivers run downhill.")
    assert answer.locator(".thinking").get_attribute("open") is None  # folded once the answer came
    expect(answer.locator(".meta")).to_contain_text("finish: stop")
