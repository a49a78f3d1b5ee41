"""End-to-end viewer test: Debian's Chromium (headless, software WebGL) driven by Playwright.

Loads the viewer from a live server on 127.0.0.1 against a small loaded database (the synthetic dataset of
test_api) and drives a search by example as a person would: two positive pins and a negative one
(Shift-click), then checks the list against ``POST /query``, the score map and the highlighted hexagons as
drawn, a download read back with pyarrow and json, the cell inspector, the URL restoring the search on
reload, the basemap toggle, the k and radius controls, and that no request leaves 127.0.0.1. Waits until
tiles really rendered (not just the map's ``idle`` event, which also fires when every tile failed).
Screenshots go to ``test-artifacts/``. Never runs ``playwright install``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_api import Synthetic, a_valid_cell, haversine, live_server, load_synthetic, serve_with

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
def base_url(synthetic, builtin_layers, default_config):
    from vectorgeo.api import create_app
    from vectorgeo.config import parse
    from vectorgeo.inputs import InputLayers

    sample = parse(default_config).sample
    inputs = InputLayers(builtin_layers, sample.patch_px, sample.patch_km)
    app = create_app(synthetic.url, serve=serve_with(default_k=K, default_radius_km=RADIUS_KM), inputs=inputs)
    with live_server(app) as url:
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
  if (!m || !m.getLayer(layer) || !m.loaded() || !m.areTilesLoaded()) return 0;
  return m.queryRenderedFeatures({layers: [layer]}).length;
}"""
LISTED = "() => [...document.querySelectorAll('#results li')].map(e => e.dataset.h3)"


class Watch:
    """A page's console errors, failed requests, HTTP errors and requests that leave this server."""

    def __init__(self, page, base_url: str) -> None:
        self.problems: list[str] = []
        self.outside: list[str] = []
        self.basemap: list[int] = []
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", lambda m: self.problems.append(f"console: {m.text}") if m.type == "error" else None)
        # tiles the map no longer needs (after a fly-to) are cancelled: ERR_ABORTED is no failure
        page.on(
            "requestfailed",
            lambda r: (
                None if "ERR_ABORTED" in (r.failure or "") else self.problems.append(f"failed: {r.url} {r.failure}")
            ),
        )
        page.on("response", self._response)
        page.on(
            "request", lambda r: None if r.url.startswith((base_url, "data:", "blob:")) else self.outside.append(r.url)
        )

    def _response(self, r) -> None:
        if r.status >= 400:
            self.problems.append(f"HTTP {r.status}: {r.url}")
        if "/basemap/" in r.url:
            self.basemap.append(r.status)


def open_viewer(browser, url: str, base_url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    watch = Watch(page, base_url)
    page.goto(url)
    page.wait_for_function(
        "() => ['ready', 'results', 'empty', 'error'].includes(document.body.dataset.status)", timeout=60_000
    )
    return page, watch


def click_cell(page, s: Synthetic, cell: str, shift: bool = False) -> None:
    i = s.index(cell)
    x, y = page.evaluate(
        "([lng, lat]) => { const p = window.vectorgeo.map.project([lng, lat]); return [p.x, p.y]; }",
        [float(s.lng[i]), float(s.lat[i])],
    )
    box = page.locator("#map").bounding_box()
    n = page.evaluate("() => window.vectorgeo.state.seq")
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(box["x"] + x, box["y"] + y)
    if shift:
        page.keyboard.up("Shift")
    page.wait_for_function(f"() => window.vectorgeo.state.seq > {n}", timeout=10_000)
    page.wait_for_function("() => document.body.dataset.status !== 'loading'", timeout=30_000)


def test_viewer_search_by_example(browser, base_url, synthetic, tmp_path):
    page, watch = open_viewer(browser, base_url + "/", base_url)
    # base layers drawn from this server: embedding hexagons, Blue Marble
    page.wait_for_function(f"() => ({RENDERED})('cells') > 0", timeout=60_000)
    page.wait_for_function("() => window.vectorgeo.map.getLayoutProperty('basemap', 'visibility') !== 'none'")
    page.wait_for_function("() => window.vectorgeo.map.isSourceLoaded('basemap')", timeout=30_000)
    assert watch.basemap and set(watch.basemap) == {200}

    # two positive pins (click) and one negative (Shift-click)
    p1 = a_valid_cell(synthetic, (47.0, 10.0))
    p2 = a_valid_cell(synthetic, (46.6, 9.2))
    n1 = a_valid_cell(synthetic, (46.2, 11.5))
    click_cell(page, synthetic, p1)
    click_cell(page, synthetic, p2)
    click_cell(page, synthetic, n1, shift=True)
    page.wait_for_function("() => document.body.dataset.status === 'results'", timeout=30_000)
    roles = page.eval_on_selector_all("#pins li", "els => els.map(e => e.dataset.role)")
    assert roles == ["positive", "positive", "negative"]

    # the list equals POST /query with the same body
    request = page.evaluate("() => window.vectorgeo.state.request")
    assert len(request["positives"]) == 2 and len(request["negatives"]) == 1
    assert request["k"] == K and request["radius_m"] == RADIUS_KM * 1000
    api = httpx.post(f"{base_url}/query", json=request).json()
    listed = page.evaluate(LISTED)
    assert listed == [r["h3"] for r in api["results"]] and len(listed) == K
    scores = page.eval_on_selector_all("#results li", "els => els.map(e => Number(e.dataset.score))")
    np.testing.assert_allclose(scores, [r["score"] for r in api["results"]], atol=1e-9)
    # the pins' cells are the examples the API used
    assert [e["h3"] for e in api["examples"]] == [p1, p2, n1] and all(e["used"] for e in api["examples"])
    # rows show a readable score, the coordinates and the distance from the first pin
    first = page.locator("#results li").first.inner_text()
    assert "top" in first and "km" in first and f"{api['results'][0]['lat']:.3f}" in first
    d = page.eval_on_selector_all("#results li", "els => els.map(e => Number(e.dataset.distanceKm))")
    pin = request["positives"][0]
    want_d = haversine(
        pin["lat"],
        pin["lng"],
        np.array([r["lat"] for r in api["results"]]),
        np.array([r["lng"] for r in api["results"]]),
    )
    np.testing.assert_allclose(d, want_d / 1000, rtol=1e-6)

    # the score layer renders, with the API's scores
    page.wait_for_function(f"() => ({RENDERED})('scores') > 50", timeout=60_000)
    drawn = page.evaluate(
        "() => window.vectorgeo.map.queryRenderedFeatures({layers: ['scores']})"
        ".map(f => [f.properties.h3, f.properties.score])"
    )
    assert min(v for _, v in drawn) < 0.5 < max(v for _, v in drawn)  # a map of all cells, not only the best
    # the results are highlighted hexagons, coloured by score
    page.wait_for_function(f"() => ({RENDERED})('results-fill') > 0", timeout=30_000)
    data = page.evaluate("async () => await window.vectorgeo.map.getSource('results').getData()")
    assert [f["properties"]["h3"] for f in data["features"]] == listed
    assert len({f["properties"]["colour"] for f in data["features"]}) > 3
    assert page.evaluate(f"() => ({RENDERED})('pins')") == 3
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-query.png"))

    # downloads: GeoParquet and GeoJSON hold the listed cells
    with page.expect_download() as dl:
        page.click("#export-parquet")
    t = pq.read_table(io.BytesIO(Path(dl.value.path()).read_bytes()))
    assert dl.value.suggested_filename.endswith(".parquet") and t.column("h3").to_pylist() == listed
    with page.expect_download() as dl:
        page.click("#export-geojson")
    fc = json.loads(Path(dl.value.path()).read_text())
    assert [f["properties"]["h3"] for f in fc["features"]] == listed

    # a click on a row flies there and opens the inspector: the model's input patches and imagery
    target = api["results"][3]
    page.locator("#results li").nth(3).click()
    page.wait_for_function(
        "([lat, lng]) => { const c = window.vectorgeo.map.getCenter(); const m = window.vectorgeo.map;"
        " return !m.isMoving() && Math.abs(c.lat - lat) < 1e-3 && Math.abs(c.lng - lng) < 1e-3; }",
        arg=[target["lat"], target["lng"]],
        timeout=30_000,
    )
    page.wait_for_function(f"() => document.getElementById('inspector').dataset.h3 === '{target['h3']}'")
    # zoomed in, the score layer draws the loaded cells themselves, with the API's scores
    page.wait_for_function(f"() => ({RENDERED})('scores') > 0", timeout=60_000)
    drawn = dict(
        page.evaluate(
            "() => window.vectorgeo.map.queryRenderedFeatures({layers: ['scores']})"
            ".map(f => [f.properties.h3, f.properties.score])"
        )
    )
    common = [r for r in api["results"] if r["h3"] in drawn]
    assert target in common
    np.testing.assert_allclose([drawn[r["h3"]] * 100 for r in common], [r["score"] for r in common], atol=1e-3)
    assert page.locator("#patches figure[data-layer=landcover] canvas").count() == 1
    assert page.locator("#patches figure[data-layer=elevation] canvas").count() == 1
    assert page.locator("#patches figure[data-layer=imagery] canvas").count() == 1  # the RGB layer
    assert page.locator("#patches figure[data-layer=landcover] .legend-items li").count() >= 1
    page.wait_for_function("() => document.querySelector('#patches img').naturalWidth > 0", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "viewer-inspector.png"))

    # the URL holds the search: a reload restores pins, mode, radius, k and the results
    assert "p=" in page.url and "n=" in page.url and f"k={K}" in page.url
    page2, watch2 = open_viewer(browser, page.url, base_url)
    page2.wait_for_function("() => document.body.dataset.status === 'results'", timeout=30_000)
    assert page2.eval_on_selector_all("#pins li", "els => els.map(e => e.dataset.role)") == roles
    assert page2.evaluate(LISTED) == listed
    page2.wait_for_function(f"() => ({RENDERED})('scores') > 0", timeout=60_000)
    page2.screenshot(path=str(ARTIFACTS / "viewer-restored.png"))
    page2.close()

    # the basemap toggles
    page.uncheck("#basemap-toggle")
    assert page.evaluate("() => window.vectorgeo.map.getLayoutProperty('basemap', 'visibility')") == "none"
    assert page.evaluate("() => window.vectorgeo.map.getLayoutProperty('countries-fill', 'visibility')") == "visible"
    assert "basemap=0" in page.url
    page.screenshot(path=str(ARTIFACTS / "viewer-no-basemap.png"))
    page.check("#basemap-toggle")
    assert page.evaluate("() => window.vectorgeo.map.getLayoutProperty('basemap', 'visibility')") == "visible"

    # k and radius controls re-run the search
    page.fill("#k", "5")
    page.dispatch_event("#k", "change")
    page.wait_for_function("() => document.querySelectorAll('#results li').length === 5", timeout=30_000)
    assert page.evaluate(LISTED) == listed[:5]
    page.fill("#radius-num", "40")
    page.dispatch_event("#radius-num", "change")
    page.wait_for_function("() => window.vectorgeo.state.request && window.vectorgeo.state.request.radius_m === 40000")
    page.wait_for_function("() => document.body.dataset.status === 'results'")
    near = page.eval_on_selector_all("#results li", "els => els.map(e => Number(e.dataset.distanceKm))")
    assert near and max(near) <= 40.5

    # removing the negative pin re-runs the search with the positives only
    page.locator("#pins li.negative button.remove").click()
    page.wait_for_function(
        "() => window.vectorgeo.state.request && window.vectorgeo.state.request.negatives.length === 0"
    )
    assert "n=" not in page.url

    assert page.evaluate("() => window.vectorgeo.errors") == []
    assert watch.problems == [] and watch2.problems == [], watch.problems + watch2.problems
    assert watch.outside == [] and watch2.outside == []
    page.close()


def test_viewer_pin_without_embedding_says_so(browser, base_url, synthetic):
    """A positive pin beyond the loaded cells: no crash, the pin is marked with the reason."""
    page, watch = open_viewer(browser, base_url + "/?p=-10,-60&k=5&radius=0", base_url)
    page.wait_for_function("() => document.body.dataset.status === 'empty'", timeout=30_000)
    assert "not loaded" in page.text_content("#status")
    # the only problem: the 404 of /query (and Chromium's console line about it)
    assert watch.problems and all("404" in p for p in watch.problems), watch.problems
    assert any(p.startswith("HTTP 404") and "/query" in p for p in watch.problems)
    assert watch.outside == []
    page.close()
