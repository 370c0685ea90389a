"""`mmcl serve` on the digits index: the JSON API and its bad requests, and the page in headless Chromium.

The index comes from conftest's digits_search_index (the tiny CLIP trained once a session, `mmcl embed`,
`mmcl index build`); the server is a real `python -m mmcl serve` process on a loopback port.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port, subprocess_env
from mmcl.data_pipelines.tarstream import sample_at
from mmcl.search.query import Searcher

pytestmark = pytest.mark.slow
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def searcher(digits_search_index) -> Searcher:
    return Searcher(str(digits_search_index["exact"]))


def label_of(searcher: Searcher, image_id: int) -> int:
    return int(sample_at(searcher.images["shard"][image_id], searcher.images["offset"][image_id])["cls"])


@pytest.fixture(scope="module")
def server(digits_search_index):
    """`mmcl serve` on a free loopback port, for the module."""
    port = free_port()
    command = [sys.executable, "-m", "mmcl", "serve", str(digits_search_index["exact"]), "--port", str(port)]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mmcl serve exited with {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            if call(url + "/api/info")[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("mmcl serve did not answer within 180 s")
    yield {"url": url, "process": process}
    process.terminate()
    process.wait(timeout=30)


def call(url: str, body: bytes = None, content_type: str = None):
    """(status, parsed JSON or raw bytes, content type) of one HTTP request."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, data, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, data, kind = err.code, err.read(), err.headers.get("Content-Type", "")
    return status, (json.loads(data) if kind.startswith("application/json") else data), kind


def post_raw(url: str, headers: dict, chunks: list):
    """(status, JSON) of a POST whose headers and body are sent exactly as given."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.putrequest("POST", parts.path)
        for name, value in dict(headers, **{"Content-Type": "image/png"}).items():
            connection.putheader(name, value)
        connection.endheaders()
        for chunk in chunks:
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if chunks:
            connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_api_answers_and_refuses_bad_requests(server, searcher):
    url = server["url"]
    status, data, _ = call(url + "/search?text=a%20handwritten%20seven&k=4")
    assert status == 200 and [r["rank"] for r in data["results"]] == [1, 2, 3, 4]
    first = data["results"][0]
    status, image, kind = call(url + first["image_url"])
    assert status == 200 and kind == "image/png" and image == searcher.image_bytes(first["image_id"])[0]
    png = searcher.image_bytes(7)[0]
    status, data, _ = call(url + "/search/image?k=3&to=image", png, "image/png")
    assert status == 200 and len(data["results"]) == 3 and data["results"][0]["image_id"] == 7
    status, data, _ = call(url + "/search/image?k=3&to=text", png, "image/png")
    digit = label_of(searcher, 7)
    assert status == 200 and [r["rank"] for r in data["results"]] == [1, 2, 3]
    assert re.search(rf"\b({WORDS[digit]}|{digit})\b", data["results"][0]["caption"]), data
    bad = [  # (request, status, words of the message)
        (("/search?text=a%20seven&k=0",), 422, "k:"),
        (("/search?text=a%20seven&k=101",), 422, "k:"),
        (("/search?text=a%20seven&k=many",), 422, "k:"),
        (("/search?k=3",), 422, "text:"),
        (("/search?text=%20%20&k=3",), 400, "empty query"),
        (("/search?text=" + "a" * 1001,), 422, "text:"),
        (("/search?text=seven&to=sound",), 422, "to:"),
        (("/search/image", png, "text/plain"), 415, "Content-Type text/plain"),
        (("/search/image", b"GIF89a, or so it says", "image/gif"), 400, "not an image that decodes"),
        (("/image/1000",), 404, "no image 1000"),
        (("/image/-1",), 404, "no image -1"),
        (("/image/x",), 422, "image_id:"),
        (("/nowhere",), 404, "Not Found"),
    ]
    for (path, *upload), code, words in bad:
        status, data, kind = call(url + path, *upload)
        assert status == code and kind.startswith("application/json") and words in data["detail"], (path, status, data)
    too_big = 8 * 2**20 + 1
    status, data = post_raw(url + "/search/image", {"Content-Length": str(too_big)}, [])  # refused on the header
    assert status == 413 and "larger than" in data["detail"]
    chunks = [b"\0" * 2**20] * 8 + [b"\0"]  # no length declared: refused once the body passes the limit
    status, data = post_raw(url + "/search/image", {"Transfer-Encoding": "chunked"}, chunks)
    assert status == 413 and "larger than" in data["detail"]
    assert server["process"].poll() is None  # still serving
    assert call(url + "/search?text=a%20handwritten%20seven&k=1")[0] == 200


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        message = "headless Chromium is missing: apt-get update && apt-get install -y chromium (.ci/run does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return path


BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RENDERED = """k => { const images = [...document.querySelectorAll('#results figure.result img')];
                     return images.length === k && images.every(i => i.complete && i.naturalWidth > 0); }"""


def test_page_in_headless_chromium(server, searcher, tmp_path):
    """The served page in a real browser: type a query, k result images render; then search by an upload."""
    sync_api = pytest.importorskip("playwright.sync_api")
    artefacts = Path(os.environ.get("MMCL_TEST_ARTIFACTS", REPO / "test-artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    upload = tmp_path / "query.png"
    upload.write_bytes(searcher.image_bytes(42)[0])
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium(), headless=True, args=BROWSER_ARGS,
            viewport={"width": 1100, "height": 720})
        try:
            page = browser.new_page()
            page.goto(server["url"] + "/")
            page.fill("#q", "a handwritten seven")
            page.fill("#k", "8")
            page.press("#q", "Enter")
            page.wait_for_function(RENDERED, arg=8, timeout=60_000)
            captions = page.eval_on_selector_all("#results figcaption", "els => els.map(e => e.textContent)")
            page.screenshot(path=str(artefacts / "search_page.png"), full_page=True)
            assert len(captions) == 8 and "8 images for a handwritten seven" in page.inner_text("#status")
            page.set_input_files("#file", str(upload))
            page.wait_for_function("() => document.querySelector('#status').textContent.includes('(image)')",
                                   timeout=60_000)
            page.wait_for_function(RENDERED, arg=8, timeout=60_000)
            assert page.inner_text("#results figure.result .key >> nth=0") == searcher.images["key"][42]
            page.fill("#q", "   ")
            page.press("#q", "Enter")
            page.wait_for_selector("#status.error", timeout=60_000)
            assert "empty query" in page.inner_text("#status")
        finally:
            browser.close()
    assert (artefacts / "search_page.png").stat().st_size > 10_000
