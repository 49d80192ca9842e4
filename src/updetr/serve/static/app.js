// The page: choose or upload a picture, drag a box, draw the models' answers; the slider filters them live.
"use strict";

const COLORS = { pretrain: "#ff1744", oneshot: "#00c853", detector: "#2979ff" };
const MAX_VIEW = 640; // pictures larger than this are shown scaled down (boxes stay in image pixels)
const MIN_VIEW = 384; // and smaller ones (the benchmark's 192-256 px images) scaled up
const state = {
  info: null, source: null, target: null, images: {}, box: null, drag: null,
  answers: {}, // model -> answer of the last request
  timings: [], // [{model_ms, page_ms}] of every query answered
  drawn: [], // boxes drawn on the page now: {model, box_xyxy, score, label, color}
  busy: false,
};
window.updetr = state; // read by the browser test

const $ = (id) => document.getElementById(id);
const threshold = () => parseFloat($("threshold").value);

function showError(message) { $("error").textContent = message || ""; }

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function picture(id) { return state.info.pictures.find((p) => p.id === id); }

function loadImage(pic) {
  if (state.images[pic.id]) return Promise.resolve(state.images[pic.id]);
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => { state.images[pic.id] = img; resolve(img); };
    img.onerror = () => reject(new Error(`cannot load ${pic.name}`));
    img.src = pic.url;
  });
}

function scaleOf(pic) {
  const side = Math.max(pic.width, pic.height);
  return Math.min(MAX_VIEW / side, Math.max(1, MIN_VIEW / side));
}

function setupCanvas(canvas, pic) {
  const s = scaleOf(pic);
  canvas.width = Math.round(pic.width * s);
  canvas.height = Math.round(pic.height * s);
  canvas.dataset.scale = String(s);
}

function drawBox(ctx, s, xyxy, color, text, dashed) {
  const [x0, y0, x1, y1] = xyxy.map((v) => v * s);
  ctx.save();
  ctx.lineWidth = dashed ? 2 : 3;
  ctx.strokeStyle = color;
  if (dashed) ctx.setLineDash([6, 4]);
  ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  if (text) {
    ctx.font = "bold 13px system-ui, sans-serif";
    const w = ctx.measureText(text).width + 6;
    const ty = y0 >= 17 ? y0 - 17 : y0;
    ctx.fillStyle = color;
    ctx.fillRect(x0, ty, w, 17);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x0 + 3, ty + 13);
  }
  ctx.restore();
}

function targetPic() { return state.target || state.source; }

function render() {
  const src = $("source-canvas"), tgt = $("target-canvas");
  const separate = state.target && state.target.id !== state.source.id;
  $("target-view").hidden = !separate;
  const views = [[src, state.source]];
  if (separate) views.push([tgt, state.target]);
  for (const [canvas, pic] of views) {
    const ctx = canvas.getContext("2d");
    const img = state.images[pic.id];
    if (img) ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  }
  const sctx = src.getContext("2d"), ss = parseFloat(src.dataset.scale);
  const box = state.drag || state.box;
  if (box) {
    const [x, y, w, h] = box;
    drawBox(sctx, ss, [x, y, x + w, y + h], "#ffffff", null, true);
    drawBox(sctx, ss, [x, y, x + w, y + h], "#000000", state.drag ? null : "your box", true);
  }
  const out = separate ? tgt : src;
  const octx = out.getContext("2d"), os = parseFloat(out.dataset.scale);
  state.drawn = [];
  const t = threshold();
  for (const [model, answer] of Object.entries(state.answers)) {
    if (answer.target !== targetPic().id) continue;
    for (const b of answer.boxes) {
      if (b.score < t) continue;
      drawBox(octx, os, b.box_xyxy, COLORS[model], `${b.label} ${b.score.toFixed(2)}`, false);
      state.drawn.push({ model, box_xyxy: b.box_xyxy, score: b.score, label: b.label, color: COLORS[model] });
    }
  }
  renderAnswers();
}

function renderAnswers() {
  const list = $("answer-list");
  list.textContent = "";
  const t = threshold();
  for (const [model, answer] of Object.entries(state.answers)) {
    const kept = answer.boxes.filter((b) => b.score >= t);
    const best = answer.boxes.length ? answer.boxes[0].score.toFixed(2) : "–";
    const row = document.createElement("div");
    row.className = "answer";
    row.dataset.model = model;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = COLORS[model];
    row.appendChild(swatch);
    const page = answer.page_ms !== undefined ? `, ${answer.page_ms.toFixed(0)} ms on the page` : "";
    row.appendChild(document.createTextNode(
      `${answer.title}: ${kept.length} of ${answer.boxes.length} boxes above ${t.toFixed(2)} ` +
      `(best ${best}); model ${answer.ms.toFixed(0)} ms${page}`));
    list.appendChild(row);
  }
}

async function choose() {
  showError("");
  state.source = picture($("source").value);
  state.target = $("target").value ? picture($("target").value) : null;
  state.box = null;
  state.answers = {};
  setupCanvas($("source-canvas"), state.source);
  if (state.target) setupCanvas($("target-canvas"), state.target);
  await Promise.all([loadImage(state.source), state.target ? loadImage(state.target) : null]);
  render();
  if (state.info.models.detector) await detect();
}

async function detect() {
  const pic = targetPic();
  try {
    const start = performance.now();
    const result = await api("/api/detect", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: pic.id }) });
    for (const a of result.answers) { a.target = result.target; a.page_ms = performance.now() - start; state.answers[a.model] = a; }
    render();
  } catch (err) { showError(err.message); }
}

async function query(box) {
  const pic = targetPic();
  state.busy = true;
  $("status").textContent = "finding…";
  const start = performance.now();
  try {
    const result = await api("/api/query", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: state.source.id, box, target: pic.id }) });
    for (const a of result.answers) { a.target = result.target; state.answers[a.model] = a; }
    render(); // drawn: the answer is on the page
    const pageMs = performance.now() - start;
    for (const a of result.answers) a.page_ms = pageMs;
    renderAnswers();
    const model = result.answers.reduce((s, a) => s + a.ms, 0);
    state.timings.push({ model_ms: model, page_ms: pageMs });
    $("status").textContent = `answered in ${pageMs.toFixed(0)} ms (models ${model.toFixed(0)} ms)`;
  } catch (err) {
    showError(err.message);
    $("status").textContent = "";
  } finally {
    state.busy = false;
  }
}

function imageXY(event) {
  const canvas = $("source-canvas"), s = parseFloat(canvas.dataset.scale);
  const rect = canvas.getBoundingClientRect();
  const x = Math.min(Math.max(event.clientX - rect.left, 0), canvas.width) / s;
  const y = Math.min(Math.max(event.clientY - rect.top, 0), canvas.height) / s;
  return [x, y];
}

function setupDrawing() {
  const canvas = $("source-canvas");
  let start = null;
  canvas.addEventListener("mousedown", (e) => { start = imageXY(e); state.drag = [start[0], start[1], 0, 0]; e.preventDefault(); });
  window.addEventListener("mousemove", (e) => {
    if (!start) return;
    const [x, y] = imageXY(e);
    state.drag = [Math.min(x, start[0]), Math.min(y, start[1]), Math.abs(x - start[0]), Math.abs(y - start[1])];
    render();
  });
  window.addEventListener("mouseup", (e) => {
    if (!start) return;
    const [x, y] = imageXY(e);
    const box = [Math.min(x, start[0]), Math.min(y, start[1]), Math.abs(x - start[0]), Math.abs(y - start[1])]
      .map((v) => Math.round(v * 10) / 10);
    start = null;
    state.drag = null;
    if (box[2] < 2 || box[3] < 2) { render(); return; } // a click, not a box
    state.box = box;
    render();
    query(box);
  });
}

async function upload(file) {
  showError("");
  try {
    const added = await api("/api/upload", { method: "POST", body: file,
      headers: { "Content-Type": "application/octet-stream" } }); // the bytes only: no file name is sent
    state.info.pictures.push(added);
    for (const id of ["source", "target"]) $(id).appendChild(new Option(added.name + " " + added.id.slice(-4), added.id));
    $("source").value = added.id;
    await choose();
  } catch (err) { showError(err.message); }
}

async function main() {
  try {
    state.info = await api("/api/info");
  } catch (err) { showError(err.message); return; }
  for (const p of state.info.pictures) {
    $("source").appendChild(new Option(p.name, p.id));
    $("target").appendChild(new Option(p.name, p.id));
  }
  const names = Object.entries(state.info.models).map(([k, m]) => `${k}: ${m.path}`);
  $("status").textContent = "models: " + names.join("; ");
  $("detect").hidden = !state.info.models.detector;
  $("detect").addEventListener("click", detect);
  $("source").addEventListener("change", choose);
  $("target").addEventListener("change", choose);
  $("threshold").addEventListener("input", () => { $("threshold-value").textContent = threshold().toFixed(2); render(); });
  $("upload").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
  setupDrawing();
  await choose();
  document.body.dataset.ready = "1";
}

main();
