"""End-to-end viewer test: Debian's Chromium (headless, software WebGL) driven by Playwright.

Loads the viewer from a live server on 127.0.0.1 against a small loaded database, waits until hexagon
tiles really rendered (not just the map's ``idle`` event, which also fires when every tile failed),
clicks a cell, and checks the result list and the highlighted hexagons against the API and a brute-force
answer. Saves ``test-artifacts/viewer.png``. Never runs ``playwright install``.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_api import Synthetic, a_valid_cell, live_server, load_synthetic, serve_with

pytestmark = [pytest.mark.db, pytest.mark.browser]

CHROMIUM = os.environ.get("VECTORGEO_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
    "--ignore-gpu-blocklist",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
K = 20
RADIUS_KM = 150


@pytest.fixture(scope="module")
def synthetic(pg_cluster, tmp_path_factory) -> Synthetic:
    return load_synthetic(pg_cluster, tmp_path_factory.mktemp("viewer-regions"))


@pytest.fixture(scope="module")
def base_url(synthetic):
    from vectorgeo.api import create_app

    with live_server(create_app(synthetic.url, serve=serve_with(default_k=K, default_radius_km=RADIUS_KM))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: run `bash setup/browser.sh`")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


RENDERED = """(layer) => {
  const m = window.vectorgeo && window.vectorgeo.map;
  if (!m || !m.loaded() || !m.areTilesLoaded()) return 0;
  return m.queryRenderedFeatures({layers: [layer]}).length;
}"""


def test_viewer_click_shows_similar_cells(browser, base_url, synthetic):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    outside: list[str] = []  # the viewer must work offline: every request goes to this server
    page.on("request", lambda r: None if r.url.startswith((base_url, "data:", "blob:")) else outside.append(r.url))

    page.goto(base_url + "/")
    page.wait_for_function("() => document.body.dataset.status === 'ready'", timeout=60_000)
    # hexagons really rendered, from tiles of this server
    page.wait_for_function(f"() => ({RENDERED})('cells') > 0", timeout=60_000)
    page.wait_for_function(f"() => ({RENDERED})('countries-fill') > 0", timeout=60_000)
    assert page.evaluate("() => window.vectorgeo.errors") == []
    colours = page.evaluate(
        "() => [...new Set(window.vectorgeo.map.queryRenderedFeatures({layers: ['cells']})"
        ".map(f => f.properties.color))].length"
    )
    assert colours > 10

    # click the centre of a known cell
    cell = a_valid_cell(synthetic, (47.0, 10.0))
    i = synthetic.index(cell)
    x, y = page.evaluate(
        "([lng, lat]) => { const p = window.vectorgeo.map.project([lng, lat]); return [p.x, p.y]; }",
        [float(synthetic.lng[i]), float(synthetic.lat[i])],
    )
    box = page.locator("#map").bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + x, box["y"] + y)
    page.wait_for_function("() => document.body.dataset.status === 'results'", timeout=30_000)

    listed = page.eval_on_selector_all("#results li", "els => els.map(e => e.dataset.h3)")
    scores = page.eval_on_selector_all("#results li", "els => els.map(e => Number(e.dataset.similarity))")
    api = httpx.get(f"{base_url}/similar", params={"h3": cell, "k": K, "radius_m": RADIUS_KM * 1000}).json()
    assert listed == [r["h3"] for r in api["results"]]
    assert len(listed) == K
    np.testing.assert_allclose(scores, [r["similarity"] for r in api["results"]], atol=1e-9)
    want = synthetic.brute_similar(cell, K, RADIUS_KM * 1000)
    assert listed == [w[0] for w in want]
    assert page.text_content("#query").startswith(f"query {cell}")

    # highlight: the results layer holds exactly the listed cells and draws them; circle and query cell drawn
    page.wait_for_function(f"() => ({RENDERED})('results-fill') > 0", timeout=30_000)
    drawn = page.evaluate(
        "() => [...new Set(window.vectorgeo.map.queryRenderedFeatures({layers: ['results-fill']})"
        ".map(f => f.properties.h3))]"
    )
    assert set(drawn) <= set(listed) and len(drawn) >= K // 2
    data = page.evaluate("async () => await window.vectorgeo.map.getSource('results').getData()")
    assert [f["properties"]["h3"] for f in data["features"]] == listed
    opacities = [f["properties"]["opacity"] for f in data["features"]]
    assert opacities[0] == pytest.approx(0.9) and opacities[-1] == pytest.approx(0.2)  # opacity by score
    assert page.evaluate(f"() => ({RENDERED})('circle-line')") > 0
    assert page.evaluate(f"() => ({RENDERED})('query-line')") > 0

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer.png"))

    # the k control re-runs the search
    page.fill("#k", "5")
    page.dispatch_event("#k", "change")
    page.wait_for_function("() => document.querySelectorAll('#results li').length === 5", timeout=30_000)
    assert page.eval_on_selector_all("#results li", "els => els.map(e => e.dataset.h3)") == listed[:5]

    # the radius control re-runs the search within the new circle
    page.fill("#radius-num", "60")
    page.dispatch_event("#radius-num", "change")
    want60 = [w[0] for w in synthetic.brute_similar(cell, 5, 60_000)]
    page.wait_for_function(
        "(want) => [...document.querySelectorAll('#results li')].map(e => e.dataset.h3).join() === want.join()",
        arg=want60,
        timeout=30_000,
    )

    # dragging the circle moves the query to the cell under its new centre
    target = a_valid_cell(synthetic, (45.5, 12.5))
    j = synthetic.index(target)
    tx, ty = page.evaluate(
        "([lng, lat]) => { const p = window.vectorgeo.map.project([lng, lat]); return [p.x, p.y]; }",
        [float(synthetic.lng[j]), float(synthetic.lat[j])],
    )
    page.mouse.move(box["x"] + x, box["y"] + y)
    page.mouse.down()
    page.mouse.move(box["x"] + (x + tx) / 2, box["y"] + (y + ty) / 2, steps=5)
    page.mouse.move(box["x"] + tx, box["y"] + ty, steps=5)
    page.mouse.up()
    page.wait_for_function(
        "(h3) => document.getElementById('query').textContent.startsWith('query ' + h3)", arg=target, timeout=30_000
    )
    page.wait_for_function("() => document.body.dataset.status === 'results'", timeout=30_000)
    want_drag = [w[0] for w in synthetic.brute_similar(target, 5, 60_000)]
    assert page.eval_on_selector_all("#results li", "els => els.map(e => e.dataset.h3)") == want_drag

    assert page.evaluate("() => window.vectorgeo.errors") == []
    assert problems == []
    assert outside == []

    # a click outside the loaded cells says so instead of failing (the only problem: /point's 404)
    page.mouse.click(box["x"] + box["width"] - 8, box["y"] + 8)  # top-right corner: beyond the loaded box
    page.wait_for_function("() => document.body.dataset.status === 'empty'", timeout=30_000)
    assert "No embedding here" in page.text_content("#status")
    assert problems and all("404" in p for p in problems)
    assert any(p.startswith("HTTP 404") and "/point?" in p for p in problems)
    page.close()
