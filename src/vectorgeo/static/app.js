// vectorgeo viewer: hexagon tiles coloured by embedding, click (or drag the circle) to search similar cells.
// Every asset comes from this server (MapLibre GL JS from the npm registry, installed by setup/npm.sh).
import * as maplibregl from '/vendor/maplibre-gl/maplibre-gl.mjs';

const EMPTY = { type: 'FeatureCollection', features: [] };
const $ = (id) => document.getElementById(id);
const errors = [];
const state = { query: null, results: [], radiusKm: 500, k: 50, seq: 0 };
window.vectorgeo = { errors, state };

function setStatus(text, status, isError = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
  document.body.dataset.status = status;
}

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error(body.message || `${r.status} ${r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return body;
}

// Geodesic circle (spherical Earth) as a GeoJSON polygon ring of n points.
function circlePolygon(lat, lng, radiusM, n = 96) {
  const R = 6371008.8, d = radiusM / R, la = (lat * Math.PI) / 180, lo = (lng * Math.PI) / 180;
  const ring = [];
  for (let i = 0; i <= n; i++) {
    const b = (2 * Math.PI * i) / n;
    const la2 = Math.asin(Math.sin(la) * Math.cos(d) + Math.cos(la) * Math.sin(d) * Math.cos(b));
    const lo2 = lo + Math.atan2(Math.sin(b) * Math.sin(d) * Math.cos(la), Math.cos(d) - Math.sin(la) * Math.sin(la2));
    ring.push([(lo2 * 180) / Math.PI, (la2 * 180) / Math.PI]);
  }
  return { type: 'Feature', properties: {}, geometry: { type: 'Polygon', coordinates: [ring] } };
}

function hexFeature(cell, props) {
  const ring = cell.boundary.slice();
  ring.push(ring[0]);
  return { type: 'Feature', properties: { h3: cell.h3, ...props }, geometry: { type: 'Polygon', coordinates: [ring] } };
}

function style() {
  return {
    version: 8,
    sources: {
      countries: { type: 'geojson', data: location.origin + '/countries.geojson' },
      cells: {
        type: 'vector',
        tiles: [location.origin + '/tiles/{z}/{x}/{y}.pbf'],
        minzoom: 0,
        maxzoom: meta.tile_maxzoom,
      },
      results: { type: 'geojson', data: EMPTY },
      circle: { type: 'geojson', data: EMPTY },
      query: { type: 'geojson', data: EMPTY },
    },
    layers: [
      { id: 'background', type: 'background', paint: { 'background-color': '#dfe8ef' } },
      { id: 'countries-fill', type: 'fill', source: 'countries', paint: { 'fill-color': '#f3f0e8' } },
      {
        id: 'cells', type: 'fill', source: 'cells', 'source-layer': 'cells',
        paint: { 'fill-color': ['get', 'color'], 'fill-opacity': 0.85, 'fill-outline-color': 'rgba(0,0,0,0.08)' },
      },
      { id: 'countries-line', type: 'line', source: 'countries', paint: { 'line-color': '#6b6b6b', 'line-width': 0.7 } },
      { id: 'circle-fill', type: 'fill', source: 'circle', paint: { 'fill-color': '#1565c0', 'fill-opacity': 0.07 } },
      { id: 'circle-line', type: 'line', source: 'circle', paint: { 'line-color': '#1565c0', 'line-width': 2, 'line-dasharray': [3, 2] } },
      {
        id: 'results-fill', type: 'fill', source: 'results',
        paint: { 'fill-color': '#ff2d55', 'fill-opacity': ['get', 'opacity'] },
      },
      { id: 'results-line', type: 'line', source: 'results', paint: { 'line-color': '#9b0030', 'line-width': 1 } },
      { id: 'query-line', type: 'line', source: 'query', paint: { 'line-color': '#000', 'line-width': 2.5 } },
    ],
  };
}

let meta;
let map;

function drawCircle() {
  const q = state.query;
  const source = map && map.getSource('circle');
  if (!source) return; // style not loaded yet
  source.setData(q ? { type: 'FeatureCollection', features: [circlePolygon(q.lat, q.lng, state.radiusKm * 1000)] } : EMPTY);
}

function renderResults() {
  const list = $('results');
  list.replaceChildren();
  const rs = state.results;
  const scores = rs.map((r) => r.similarity);
  const lo = Math.min(...scores), hi = Math.max(...scores);
  const features = rs.map((r) => {
    const t = hi > lo ? (r.similarity - lo) / (hi - lo) : 1;
    return hexFeature(r, { similarity: r.similarity, opacity: 0.2 + 0.7 * t });
  });
  map.getSource('results').setData({ type: 'FeatureCollection', features });
  for (const r of rs) {
    const li = document.createElement('li');
    li.dataset.h3 = r.h3;
    li.dataset.similarity = String(r.similarity);
    const t = hi > lo ? (r.similarity - lo) / (hi - lo) : 1;
    li.innerHTML = `<span class="score">${r.similarity.toFixed(4)}</span>${r.h3}<span class="bar" style="width:${Math.round(4 + 40 * t)}px"></span>`;
    li.addEventListener('click', () => map.flyTo({ center: [r.lng, r.lat], zoom: Math.max(map.getZoom(), 6) }));
    list.appendChild(li);
  }
}

async function runQuery() {
  const q = state.query;
  if (!q) return;
  const seq = ++state.seq;
  drawCircle();
  setStatus('Searching…', 'loading');
  const url = `/similar?h3=${q.h3}&k=${state.k}&radius_m=${Math.round(state.radiusKm * 1000)}&boundary=true`;
  try {
    const body = await getJSON(url);
    if (seq !== state.seq) return;
    state.results = body.results;
    renderResults();
    setStatus(`${body.results.length} similar cells within ${state.radiusKm} km`, 'results');
  } catch (e) {
    if (seq !== state.seq) return;
    state.results = [];
    renderResults();
    setStatus(`Search failed: ${e.message}`, 'error', true);
  }
}

async function select(lat, lng) {
  const seq = ++state.seq;
  setStatus('Looking up the cell…', 'loading');
  try {
    const cell = await getJSON(`/point?lat=${lat.toFixed(6)}&lng=${lng.toFixed(6)}`);
    if (seq !== state.seq) return;
    state.query = cell;
    $('query').textContent = `query ${cell.h3} (${cell.lat.toFixed(3)}, ${cell.lng.toFixed(3)})`;
    map.getSource('query').setData({ type: 'FeatureCollection', features: [hexFeature(cell, {})] });
    await runQuery();
  } catch (e) {
    if (seq !== state.seq) return;
    const msg = e.status === 404 ? 'No embedding here (ocean or outside the loaded area).' : `Lookup failed: ${e.message}`;
    setStatus(msg, 'empty', e.status !== 404);
  }
}

function setRadius(km, rerun) {
  km = Math.min(5000, Math.max(1, Number(km) || state.radiusKm));
  state.radiusKm = km;
  $('radius').value = String(km);
  $('radius-num').value = String(km);
  $('radius-out').textContent = String(km);
  drawCircle();
  if (rerun) runQuery();
}

// Drag the circle: moving it moves the query to the cell under its new centre.
function enableCircleDrag() {
  let dragging = false;
  map.on('mousedown', 'circle-fill', (e) => {
    if (!state.query) return;
    e.preventDefault();
    dragging = true;
    map.getCanvas().style.cursor = 'grabbing';
  });
  map.on('mousemove', (e) => {
    if (!dragging) return;
    state.query = { ...state.query, lat: e.lngLat.lat, lng: e.lngLat.lng };
    drawCircle();
  });
  map.on('mouseup', (e) => {
    if (!dragging) return;
    dragging = false;
    map.getCanvas().style.cursor = '';
    select(e.lngLat.lat, e.lngLat.lng);
  });
}

async function main() {
  meta = await getJSON('/meta');
  state.radiusKm = meta.default_radius_km;
  state.k = meta.default_k;
  $('k').value = String(state.k);
  map = new maplibregl.Map({
    container: 'map',
    style: style(),
    bounds: meta.bounds,
    fitBoundsOptions: { padding: 30 },
    maxZoom: 16,
    attributionControl: { compact: true, customAttribution: 'Countries: Natural Earth' },
  });
  window.vectorgeo.map = map;
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }), 'top-left');
  map.addControl(new maplibregl.ScaleControl({ unit: 'metric' }), 'bottom-left');
  map.on('error', (e) => {
    const msg = (e.error && e.error.message) || String(e);
    errors.push(msg);
    console.error('map error:', msg);
  });
  setRadius(state.radiusKm, false);
  $('radius').addEventListener('input', (e) => setRadius(e.target.value, false));
  $('radius').addEventListener('change', (e) => setRadius(e.target.value, true));
  $('radius-num').addEventListener('change', (e) => setRadius(e.target.value, true));
  $('k').addEventListener('change', (e) => {
    state.k = Math.min(1000, Math.max(1, Math.round(Number(e.target.value) || state.k)));
    e.target.value = String(state.k);
    runQuery();
  });
  $('controls').addEventListener('submit', (e) => e.preventDefault());
  map.on('load', () => {
    enableCircleDrag();
    map.on('click', (e) => select(e.lngLat.lat, e.lngLat.lng));
    map.on('mouseenter', 'cells', () => { map.getCanvas().style.cursor = 'crosshair'; });
    map.on('mouseleave', 'cells', () => { map.getCanvas().style.cursor = ''; });
    setStatus(`${meta.cells.toLocaleString()} cells at H3 resolution ${meta.resolution}. Click the map.`, 'ready');
  });
}

main().catch((e) => {
  errors.push(String(e.message || e));
  setStatus(`Viewer failed to start: ${e.message || e}`, 'error', true);
});
