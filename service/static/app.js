// The playground's script: plain browser APIs, no dependencies, talks to this server only.
// Element ids used by tests and scripts: #model #label #seed #generate #result #painting #draw
// #encode #reconstruction #tokens #edit-source #edit-mask #edit-use #repaint #extend (see README).

const $ = (sel) => document.querySelector(sel);

const el = {
  key: $("#api-key"), error: $("#error"), errorText: $("#error-text"),
  errorClose: $("#error-close"), form: $("#generate-form"), model: $("#model"),
  label: $("#label"), seed: $("#seed"), newSeed: $("#new-seed"),
  temperature: $("#temperature"), topK: $("#top-k"), topP: $("#top-p"), cfg: $("#cfg-scale"),
  rows: $("#grid-rows"), cols: $("#grid-cols"), defaults: $("#defaults"),
  generate: $("#generate"), result: $("#result"), resultInfo: $("#result-info"),
  painting: $("#painting"),
  draw: $("#draw"), clear: $("#clear"), file: $("#file"), encode: $("#encode"),
  reconstruction: $("#reconstruction"), tokens: $("#tokens"), tokensInfo: $("#tokens-info"),
  clearPrefix: $("#clear-prefix"), resample: $("#resample"), status: $("#status"),
  editSource: $("#edit-source"), editMask: $("#edit-mask"), editInfo: $("#edit-info"),
  editUse: $("#edit-use"), editFile: $("#edit-file"), editClear: $("#edit-clear"),
  brush: $("#brush"), extendBy: $("#extend-by"), repaint: $("#repaint"), extend: $("#extend"),
};

const state = {
  models: {},       // name -> GET /models entry
  map: null,        // the token map shown: {model, rows, cols, ids (flat, raster order)}
  keep: 0,          // tokens kept as the prefix of a resample
  busy: false,
};

const MAX_RETRIES = 3;  // a 503 with a short Retry-After is tried again this many times
const MAX_MAP_CELLS = 4096;  // larger token grids (canvases) are not drawn as a map

// ---- errors ------------------------------------------------------------------------------
function showError(err) {
  el.errorText.textContent = err && err.message ? err.message : String(err);
  el.error.hidden = false;
}

function clearError() {
  el.error.hidden = true;
  el.errorText.textContent = "";
}

el.errorClose.addEventListener("click", clearError);
window.addEventListener("error", (e) => showError(e.error || e.message));
window.addEventListener("unhandledrejection", (e) => showError(e.reason));

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(`${message} (HTTP ${status}, ${code})`);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

// ---- the API -----------------------------------------------------------------------------
function headers(accept, json) {
  const h = { Accept: accept };
  const key = el.key.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function apiError(r) {
  let code = "http_error";
  let message = r.statusText || "request failed";
  try {
    const body = await r.json();
    code = body.error.code;
    message = body.error.message;
  } catch (_) { /* not our error shape: keep the status line */ }
  const after = Number(r.headers.get("Retry-After"));
  return new ApiError(r.status, code, message, Number.isFinite(after) ? after : null);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(path, { method = "GET", body, accept = "application/json" } = {}) {
  const json = body !== undefined && !(body instanceof FormData);
  for (let attempt = 0; ; attempt++) {
    const r = await fetch(path, {
      method, headers: headers(accept, json), body: json ? JSON.stringify(body) : body,
    });
    if (r.ok) return r;
    const err = await apiError(r);
    if (r.status !== 503 || attempt >= MAX_RETRIES || err.retryAfter === null
        || err.retryAfter > 10) throw err;
    status(`Server busy: trying again in ${err.retryAfter} s`);
    await sleep(err.retryAfter * 1000);
  }
}

const mediaType = (r) => (r.headers.get("Content-Type") || "").split(";")[0].trim().toLowerCase();

// Server-Sent Events from a fetch body (EventSource cannot POST): calls onEvent(type, data).
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "";
  let data = [];
  const line = (text) => {
    if (text === "") {
      if (data.length) onEvent(type || "message", data.join("\n"));
      type = "";
      data = [];
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        line(buffer.slice(0, nl).replace(/\r$/, ""));
        buffer = buffer.slice(nl + 1);
      }
    }
    if (buffer) line(buffer.replace(/\r$/, ""));
    line("");
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- models and the form -----------------------------------------------------------------
function current() {
  return state.models[el.model.value];
}

function setValue(input, value) {
  input.value = value === null || value === undefined ? "" : String(value);
}

function applyDefaults() {
  const m = current();
  if (!m) return;
  const d = m.defaults || {};
  setValue(el.temperature, d.temperature);
  setValue(el.topK, d.top_k);
  setValue(el.topP, d.top_p);
  setValue(el.cfg, d.cfg_scale);
  el.topK.max = m.codebook_size;
  for (const [input, i] of [[el.rows, 0], [el.cols, 1]]) {
    input.min = m.grid[i];
    input.max = m.max_grid[i];
    input.value = m.grid[i];
  }
}

function applyModel() {
  const m = current();
  if (!m) return;
  const chosen = el.label.value;
  // a class-conditional model trained without a null class (the paper's ImageNet
  // transformer) has no "any class"; one imported without names lists its indices
  const unconditional = m.unconditional !== false;
  const count = Math.max(m.classes.length, m.n_classes || 0);
  el.label.replaceChildren(...(unconditional ? [new Option("(any class)", "")] : []));
  for (let i = 0; i < count; i++) {
    const name = m.classes[i] ?? String(i);
    el.label.append(new Option(name === String(i) ? name : `${i} \u00b7 ${name}`, String(i)));
  }
  if (chosen !== "" && Number(chosen) < count) el.label.value = chosen;
  applyDefaults();
  el.cfg.disabled = m.guidance === false;
  el.cfg.title = m.guidance === false ? "This model was trained without a null class: no guidance" : "";
  el.generate.disabled = !m.can_generate;
  el.generate.title = m.can_generate ? "" : "This model has no transformer: it only encodes and decodes";
  setMap(null);
}

async function loadModels() {
  try {
    const listing = await (await api("/models")).json();
    const previous = el.model.value;
    state.models = Object.fromEntries(listing.models.map((m) => [m.name, m]));
    el.model.replaceChildren(...listing.models.map((m) => new Option(m.name, m.name)));
    el.model.value = state.models[previous] ? previous : listing.default;
    applyModel();
    clearError();
    status(`${listing.models.length} model(s) loaded`);
  } catch (err) {
    if (err.status === 401) {
      showError(new Error(`This server needs an API key: enter it at the top right. (${err.message})`));
    } else {
      showError(err);
    }
  }
}

// A field left at the model's default is not sent, so an untouched form asks for exactly
// what a bare API call with the same model, class and seed gets.
function numberField(input, name) {
  if (input.validity.badInput) throw new Error(`${name}: not a number`);
  return input.value === "" ? null : Number(input.value);
}

function requestBody() {
  const m = current();
  const d = m.defaults || {};
  const body = { model: m.name };
  if (el.label.value !== "") body.label = Number(el.label.value);
  const seed = numberField(el.seed, "seed");
  if (seed !== null) body.seed = seed;
  const temperature = numberField(el.temperature, "temperature");
  if (temperature !== null && temperature !== d.temperature) body.temperature = temperature;
  const cfg = numberField(el.cfg, "guidance");
  if (cfg !== null && cfg !== d.cfg_scale) body.cfg_scale = cfg;
  // an empty top-k / top-p means "off", which the API spells as K / 1
  const topK = numberField(el.topK, "top-k");
  const k = topK === null ? (d.top_k === null || d.top_k === undefined ? null : m.codebook_size) : topK;
  if (k !== null && k !== d.top_k) body.top_k = k;
  const topP = numberField(el.topP, "top-p");
  const p = topP === null ? ((d.top_p ?? 1) === 1 ? null : 1) : topP;
  if (p !== null && p !== d.top_p) body.top_p = p;
  const rows = numberField(el.rows, "grid rows") ?? m.grid[0];
  const cols = numberField(el.cols, "grid columns") ?? m.grid[1];
  if (rows !== m.grid[0] || cols !== m.grid[1]) body.grid = [rows, cols];
  return body;
}

// ---- generate ----------------------------------------------------------------------------
function status(text) {
  el.status.textContent = text;
}

function setBusy(busy) {
  state.busy = busy;
  const m = current();
  el.generate.disabled = busy || !(m && m.can_generate);
  el.encode.disabled = busy;
  el.resample.disabled = busy || !canResample();
  editButtons();
}

async function showImage(img, png) {
  img.src = `data:image/png;base64,${png}`;
  await img.decode();
}

async function run(task) {
  if (state.busy) return;
  clearError();
  setBusy(true);
  try {
    await task();
  } catch (err) {
    showError(err);
    status("");
  } finally {
    setBusy(false);
  }
}

// `overrides` replace fields of the form's request; a null removes the field.
function generate(overrides = {}) {
  if (state.busy) return Promise.resolve();
  el.result.dataset.state = "streaming";  // before any await: a waiting script sees the change
  return run(async () => {
    try {
      const body = Object.assign(requestBody(), overrides);
      for (const [k, v] of Object.entries(body)) if (v === null) delete body[k];
      await sample(body);
    } catch (err) {
      el.result.dataset.state = "error";
      throw err;
    }
  });
}

async function sample(body) {
  const t0 = performance.now();
  const [rows, cols] = body.grid || current().grid;
  status("Sampling\u2026");
  setMap({ model: body.model, rows, cols, ids: [] });
  const painter = el.painting.getContext("2d");
  let painting = false;
  let answer = null;
  // the stream where the server streams this request, else its JSON answer
  const r = await api("/generate", {
    method: "POST", body, accept: "text/event-stream, application/json;q=0.9" });
  if (mediaType(r) === "text/event-stream") {
    await readEvents(r, (type, data) => {
      if (type === "row") {
        const ev = JSON.parse(data);
        if (ev.image !== 0) return;
        if (ev.top === undefined) {  // the image so far, black below
          el.result.src = `data:image/png;base64,${ev.png}`;
        } else {  // a canvas: this row's strip, painted in place
          if (!painting) {  // sized once, before any strip is drawn
            const m = state.models[body.model];
            const f = m.image_size[0] / m.grid[0];
            el.painting.width = cols * f;
            el.painting.height = rows * f;
            painting = true;
            el.result.hidden = true;
            el.painting.hidden = false;
          }
          paintStrip(painter, ev).catch(showError);
        }
        ev.tokens.forEach((id, j) => { state.map.ids[ev.row * cols + j] = id; });
        if (rows * cols <= MAX_MAP_CELLS) drawMap();
        status(`Sampling\u2026 row ${ev.row + 1} of ${rows}`);
      } else if (type === "done") {
        answer = JSON.parse(data);
      } else if (type === "error") {
        const e = JSON.parse(data).error;
        throw new ApiError("stream", e.code, e.message, null);
      }
    });
    if (!answer) throw new Error("the stream ended before the answer was complete");
  } else if (mediaType(r) === "application/json") {
    answer = await r.json();
  } else {  // a server that streams nothing answered a PNG: ask for the JSON answer
    if (r.body) await r.body.cancel();
    answer = await (await api("/generate", { method: "POST", body })).json();
  }
  const image = answer.images[0];
  el.result.classList.toggle("photo", current().channels === 3);
  await showImage(el.result, image.png);
  el.painting.hidden = true;
  el.result.hidden = false;
  el.result.dataset.state = "done";
  el.result.dataset.seed = String(answer.seed);
  const ms = Math.round(performance.now() - t0);
  el.resultInfo.textContent = `${answer.model}, seed ${answer.seed}` +
    (body.label !== undefined ? `, class ${current().classes[body.label] ?? body.label}` : "") +
    (body.prefix ? `, ${body.prefix.flat().length} tokens kept` : "") +
    (body.image ? (body.mask ? ", repainted" : ", extended") : "") + ` \u2014 ${ms} ms`;
  el.result.dataset.model = answer.model;
  setMap({ model: answer.model, rows, cols, ids: image.tokens.flat() }, "generated image");
  status(`Done in ${ms} ms`);
}

// A canvas row's strip, drawn at its pixel row.
async function paintStrip(painter, ev) {
  const strip = new Image();
  strip.src = `data:image/png;base64,${ev.png}`;
  await strip.decode();
  painter.drawImage(strip, 0, ev.top);
}

// ---- the token map -----------------------------------------------------------------------
function colour(id) {
  const hue = (id * 137.508) % 360;  // the golden angle: neighbouring ids look different
  return `hsl(${hue.toFixed(1)} ${55 + (id % 3) * 15}% ${34 + (id % 4) * 7}%)`;
}

function setMap(map, source) {
  state.map = map;
  state.keep = 0;
  if (!map) {
    el.tokens.replaceChildren();
    el.tokensInfo.textContent = "The token grid of the last image appears here.";
  } else if (source) {
    el.tokensInfo.textContent = `${source}: ${map.rows}\u00d7${map.cols} tokens of ${map.model}`;
  }
  drawMap();
}

function canResample() {
  const m = state.map && state.models[state.map.model];
  return Boolean(m && m.can_generate && state.keep > 0 && state.map.model === el.model.value);
}

function drawMap() {
  const map = state.map;
  el.clearPrefix.disabled = !state.keep;
  el.resample.disabled = state.busy || !canResample();
  if (!map) return;
  if (map.rows * map.cols > MAX_MAP_CELLS) {
    el.tokens.replaceChildren();
    el.tokensInfo.textContent = `${map.rows}\u00d7${map.cols} tokens of ${map.model}: ` +
      `too many to draw as a map (the JSON answer holds them)`;
    return;
  }
  el.tokens.style.setProperty("--cols", map.cols);
  const cells = [];
  for (let i = 0; i < map.rows * map.cols; i++) {
    const cell = document.createElement("button");
    cell.type = "button";
    cell.className = "cell";
    cell.dataset.index = String(i);
    const id = map.ids[i];
    if (id === undefined) {
      cell.classList.add("pending");
      cell.disabled = true;
    } else {
      cell.textContent = String(id);
      cell.style.background = colour(id);
      cell.title = `row ${Math.floor(i / map.cols)}, column ${i % map.cols}: token ${id}`;
      cell.dataset.id = String(id);
      if (state.keep) cell.classList.add(i < state.keep ? "kept" : "dropped");
    }
    cells.push(cell);
  }
  el.tokens.replaceChildren(...cells);
}

el.tokens.addEventListener("click", (e) => {
  const cell = e.target.closest(".cell");
  if (!cell || !state.map || cell.disabled) return;
  const keep = Number(cell.dataset.index) + 1;
  state.keep = state.keep === keep ? 0 : keep;
  drawMap();
});

el.clearPrefix.addEventListener("click", () => {
  state.keep = 0;
  drawMap();
});

// The kept tokens as rows of the map (the last may be partial), on the map's own grid; the
// seed is new, written into the form so the sample can be asked for again.
el.resample.addEventListener("click", () => {
  const { rows, cols, ids } = state.map;
  const kept = ids.slice(0, state.keep);
  const prefix = [];
  for (let i = 0; i < kept.length; i += cols) prefix.push(kept.slice(i, i + cols));
  el.seed.value = String(Math.floor(Math.random() * 2 ** 31));
  const keep = state.keep;
  const m = current();
  const grid = rows !== m.grid[0] || cols !== m.grid[1] ? [rows, cols] : null;
  generate({ prefix, grid }).then(() => {
    if (state.map && state.map.ids.length) {
      state.keep = keep;
      drawMap();
    }
  });
});

// ---- drawing, encoding, decoding ---------------------------------------------------------
const ctx = el.draw.getContext("2d");

function clearCanvas() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, el.draw.width, el.draw.height);
}

function point(e) {
  const box = el.draw.getBoundingClientRect();
  return [(e.clientX - box.left) * (el.draw.width / box.width),
    (e.clientY - box.top) * (el.draw.height / box.height)];
}

let last = null;
el.draw.addEventListener("pointerdown", (e) => {
  el.draw.setPointerCapture(e.pointerId);
  last = point(e);
  stroke(last, last);
});
el.draw.addEventListener("pointermove", (e) => {
  if (!last) return;
  const p = point(e);
  stroke(last, p);
  last = p;
});
for (const type of ["pointerup", "pointercancel"]) {
  el.draw.addEventListener(type, () => { last = null; });
}

// one round-capped segment on a 2-D context: the drawing pen and the editor's brush
function segment(context, style, width, from, to) {
  context.strokeStyle = style;
  context.lineWidth = width;
  context.lineCap = "round";
  context.lineJoin = "round";
  context.beginPath();
  context.moveTo(...from);
  context.lineTo(...to);
  context.stroke();
}

function stroke(from, to) {
  segment(ctx, "#fff", el.draw.width / 12, from, to);  // about an MNIST pen after the resize to 28 px
}

async function drawFile(file) {
  const bitmap = await createImageBitmap(file);
  const { width: W, height: H } = el.draw;
  const scale = Math.min(W / bitmap.width, H / bitmap.height);
  const w = bitmap.width * scale;
  const h = bitmap.height * scale;
  clearCanvas();
  ctx.imageSmoothingEnabled = scale < 1;  // a small digit scaled up keeps its pixels sharp
  ctx.drawImage(bitmap, (W - w) / 2, (H - h) / 2, w, h);
  ctx.imageSmoothingEnabled = true;
  bitmap.close();
}

function encodeDrawing() {
  if (state.busy) return Promise.resolve();
  el.reconstruction.dataset.state = "working";
  return run(async () => {
    try {
      const model = el.model.value;
      const blob = await new Promise((resolve) => el.draw.toBlob(resolve, "image/png"));
      const form = new FormData();
      form.append("files", blob, "drawing.png");
      status("Encoding\u2026");
      const encoded = await (await api(`/encode?model=${encodeURIComponent(model)}`,
        { method: "POST", body: form })).json();
      const grid = encoded.tokens[0];
      setMap({ model: encoded.model, rows: encoded.shape[0], cols: encoded.shape[1],
        ids: grid.flat() }, "your drawing");
      status("Decoding\u2026");
      const decoded = await (await api("/decode", {
        method: "POST", body: { model: encoded.model, tokens: grid } })).json();
      await showImage(el.reconstruction, decoded.images[0].png);
      el.reconstruction.dataset.state = "done";
      status("Encoded and decoded");
    } catch (err) {
      el.reconstruction.dataset.state = "error";
      throw err;
    }
  });
}

el.draw.addEventListener("dragover", (e) => { e.preventDefault(); });
async function encodeFile(file) {
  if (!file) return;
  try {
    await drawFile(file);
    await encodeDrawing();
  } catch (err) {
    showError(new Error(`cannot read ${file.name}: ${err.message || err}`));
  }
}
el.draw.addEventListener("drop", async (e) => {
  e.preventDefault();
  await encodeFile(e.dataTransfer.files[0]);
});
el.file.addEventListener("change", async () => {
  await encodeFile(el.file.files[0]);
  el.file.value = "";
});

// ---- editing: repaint a brushed region, extend into a wider canvas --------------------------
// The editor holds an image of whole tokens of one model (an upload of another size is fitted
// to the model's image size as /encode fits it) and a brushed mask of the same pixels; the
// request is /generate with `image` and `mask` (transparent where brushed) as data URLs.
const edit = { model: null, rows: 0, cols: 0, f: 1, last: null };
const srcCtx = el.editSource.getContext("2d");
const maskCtx = el.editMask.getContext("2d", { willReadFrequently: true });

function editButtons() {
  const m = edit.model && state.models[edit.model];
  const ok = Boolean(m && m.can_generate && edit.model === el.model.value && !state.busy);
  el.repaint.disabled = !ok;
  el.extend.disabled = !ok;
}

function setSource(drawable, width, height, model) {
  const m = state.models[model];
  const f = m.image_size[0] / m.grid[0];
  const whole = width % f === 0 && height % f === 0 && width / f >= m.grid[1]
    && height / f >= m.grid[0] && width / f <= m.max_grid[1] && height / f <= m.max_grid[0];
  const [H, W] = whole ? [height, width] : m.image_size;
  for (const c of [el.editSource, el.editMask]) {
    c.width = W;
    c.height = H;
  }
  srcCtx.fillStyle = "#000";
  srcCtx.fillRect(0, 0, W, H);
  const scale = whole ? 1 : Math.min(W / width, H / height);  // padded with black, centred
  const w = width * scale;
  const h = height * scale;
  srcCtx.imageSmoothingEnabled = !whole;
  srcCtx.drawImage(drawable, (W - w) / 2, (H - h) / 2, w, h);
  maskCtx.clearRect(0, 0, W, H);
  Object.assign(edit, { model, rows: H / f, cols: W / f, f });
  el.editSource.parentElement.classList.toggle("photo", m.channels === 3);
  el.editInfo.textContent = `${W}\u00d7${H} pixels, ${edit.rows}\u00d7${edit.cols} tokens ` +
    `of ${model}: brush over what to repaint`;
  editButtons();
}

function maskPoint(e) {
  const box = el.editMask.getBoundingClientRect();
  return [(e.clientX - box.left) * (el.editMask.width / box.width),
    (e.clientY - box.top) * (el.editMask.height / box.height)];
}

function brush(from, to) {
  segment(maskCtx, "rgba(255, 45, 85, 0.6)", Math.max(1, Number(el.brush.value) || 1) * edit.f,
          from, to);
}

el.editMask.addEventListener("pointerdown", (e) => {
  if (!edit.model) return;
  el.editMask.setPointerCapture(e.pointerId);
  edit.last = maskPoint(e);
  brush(edit.last, edit.last);
});
el.editMask.addEventListener("pointermove", (e) => {
  if (!edit.last) return;
  const p = maskPoint(e);
  brush(edit.last, p);
  edit.last = p;
});
for (const type of ["pointerup", "pointercancel"]) {
  el.editMask.addEventListener(type, () => { edit.last = null; });
}

// The brushed pixels as the API's mask: transparent where brushed, opaque white elsewhere;
// null when nothing is brushed.
function maskPNG() {
  const { width: W, height: H } = el.editMask;
  const painted = maskCtx.getImageData(0, 0, W, H).data;
  const out = new ImageData(W, H);
  let any = false;
  for (let i = 0; i < W * H; i++) {
    const hit = painted[4 * i + 3] > 0;
    any = any || hit;
    out.data.set([255, 255, 255, hit ? 0 : 255], 4 * i);
  }
  if (!any) return null;
  const c = document.createElement("canvas");
  c.width = W;
  c.height = H;
  c.getContext("2d").putImageData(out, 0, 0);
  return c.toDataURL("image/png");
}

function editGrid(rows, cols) {
  const m = state.models[edit.model];
  return rows === m.grid[0] && cols === m.grid[1] ? null : [rows, cols];
}

el.repaint.addEventListener("click", () => {
  const mask = maskPNG();
  if (!mask) {
    showError(new Error("Brush over the part of the image to repaint first"));
    return;
  }
  generate({ model: edit.model, image: el.editSource.toDataURL("image/png"), mask,
    grid: editGrid(edit.rows, edit.cols), prefix: null });
});

el.extend.addEventListener("click", () => {
  const m = state.models[edit.model];
  const by = Math.floor(Number(el.extendBy.value));
  const cols = edit.cols + 2 * by;
  if (!(by >= 1) || cols > m.max_grid[1]) {
    showError(new Error(`Extend by 1 to ${Math.floor((m.max_grid[1] - edit.cols) / 2)} cells ` +
      `each side (${edit.model}'s canvases are at most ${m.max_grid[1]} cells wide)`));
    return;
  }
  // the source centred (the API's default offset); a brushed region is repainted too
  generate({ model: edit.model, image: el.editSource.toDataURL("image/png"),
    mask: maskPNG(), grid: editGrid(edit.rows, cols), prefix: null });
});

el.editUse.addEventListener("click", async () => {
  const img = el.result;
  if (img.dataset.state !== "done" || !img.dataset.model) {
    showError(new Error("Generate an image first"));
    return;
  }
  await img.decode();
  setSource(img, img.naturalWidth, img.naturalHeight, img.dataset.model);
});
el.editFile.addEventListener("change", async () => {
  const file = el.editFile.files[0];
  el.editFile.value = "";
  if (!file) return;
  try {
    const bitmap = await createImageBitmap(file);
    setSource(bitmap, bitmap.width, bitmap.height, el.model.value);
    bitmap.close();
  } catch (err) {
    showError(new Error(`cannot read ${file.name}: ${err.message || err}`));
  }
});
el.editClear.addEventListener("click", () => {
  maskCtx.clearRect(0, 0, el.editMask.width, el.editMask.height);
});

// ---- wiring --------------------------------------------------------------------------------
el.form.addEventListener("submit", (e) => {
  e.preventDefault();
  generate();
});
el.model.addEventListener("change", () => { applyModel(); editButtons(); });
el.defaults.addEventListener("click", applyDefaults);
el.newSeed.addEventListener("click", () => {
  el.seed.value = String(Math.floor(Math.random() * 2 ** 31));
});
el.clear.addEventListener("click", () => {
  clearCanvas();
  el.reconstruction.removeAttribute("src");
  el.reconstruction.dataset.state = "empty";
});
el.encode.addEventListener("click", encodeDrawing);
el.key.value = sessionStorage.getItem("taming.apiKey") || "";
let lastKey = null;
function keyChanged() {  // Enter fires both change and submit: load once per new key
  const key = el.key.value.trim();
  if (key === lastKey) return;
  lastKey = key;
  sessionStorage.setItem("taming.apiKey", key);
  loadModels();
}
el.key.addEventListener("change", keyChanged);
$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  keyChanged();
});

clearCanvas();
keyChanged();
