// The page of `nnlab serve`: talks to the API of the same server only (v1/model, v1/classify,
// v1/generate, v1/attention); no external resource. body.dataset.state says what finished last
// ("classified", "generated"), and body.dataset.attention is "shown" once the last token's attention
// map is drawn; the browser test waits for them.
"use strict";

const $ = (id) => document.getElementById(id);
const SIZE = 28; // the grid the drawing is reduced to; the server resizes to the model's input
let classifyPath = "v1/classify?top_k=10&saliency=true"; // without saliency where the backend has none

function showError(message) {
  $("error").textContent = message || "";
}

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

// ---- the model card -----------------------------------------------------------------------------

async function loadCard() {
  const card = await (await api("v1/model")).json();
  const metrics = Object.entries(card.test_metrics || {})
    .map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(4) : v}`).join(", ");
  $("card").textContent = `${card.architecture.name}, ${card.parameters.toLocaleString()} parameters, ` +
    `${card.task} task (run ${card.run})${metrics ? "; " + metrics : ""}`;
  if (card.task === "image" && !card.saliency) classifyPath = "v1/classify?top_k=10";
  if (card.task === "image") setUpClassifier();
  if (card.task === "text") setUpGenerator(card);
}

// ---- classification -----------------------------------------------------------------------------

function setUpClassifier() {
  $("classifier").hidden = false;
  const canvas = $("draw");
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 22;
  ctx.lineCap = ctx.lineJoin = "round";
  let drawing = false;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  canvas.addEventListener("pointerdown", (e) => { drawing = true; ctx.beginPath(); ctx.moveTo(...at(e)); });
  canvas.addEventListener("pointermove", (e) => { if (drawing) { ctx.lineTo(...at(e)); ctx.stroke(); } });
  window.addEventListener("pointerup", () => { drawing = false; });
  $("clear").addEventListener("click", () => { clear(); $("bars").replaceChildren(); });
  $("classify").addEventListener("click", () => classifyDrawing(canvas).catch((e) => showError(e.message)));
  $("file").addEventListener("change", () => classifyFile($("file").files[0]).catch((e) => showError(e.message)));
}

function gridOf(canvas) {
  // The drawing reduced to SIZE x SIZE grey values by the browser's smoothing.
  const small = document.createElement("canvas");
  small.width = small.height = SIZE;
  const ctx = small.getContext("2d");
  ctx.drawImage(canvas, 0, 0, SIZE, SIZE);
  const rgba = ctx.getImageData(0, 0, SIZE, SIZE).data;
  const rows = [];
  for (let y = 0; y < SIZE; y++) {
    const row = [];
    for (let x = 0; x < SIZE; x++) row.push(rgba[4 * (y * SIZE + x)]);
    rows.push(row);
  }
  return rows;
}

async function classifyDrawing(canvas) {
  showError("");
  const pixels = gridOf(canvas);
  const response = await api(classifyPath, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({pixels}),
  });
  show(await response.json(), (ctx, w, h) => drawGrey(ctx, pixels, w, h));
}

async function classifyFile(file) {
  if (!file) return;
  showError("");
  const form = new FormData();
  form.append("file", file);
  const response = await api(classifyPath, {method: "POST", body: form});
  const answer = await response.json();
  const bitmap = await createImageBitmap(file);
  // Centred at its own aspect ratio, as the server pads it square, so the saliency map lies over it.
  const side = Math.max(bitmap.width, bitmap.height);
  show(answer, (ctx, w, h) => ctx.drawImage(bitmap, (side - bitmap.width) / 2 * w / side,
    (side - bitmap.height) / 2 * h / side, bitmap.width * w / side, bitmap.height * h / side));
}

function drawGrey(ctx, rows, w, h) {
  const cw = w / rows[0].length, ch = h / rows.length;
  rows.forEach((row, y) => row.forEach((v, x) => {
    ctx.fillStyle = `rgb(${v},${v},${v})`;
    ctx.fillRect(x * cw, y * ch, cw + 0.5, ch + 0.5);
  }));
}

function show(answer, drawInput) {
  const canvas = $("saliency");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  drawInput(ctx, canvas.width, canvas.height);
  const map = answer.saliency || [[0]];
  const peak = Math.max(...map.flat()) || 1;
  const cw = canvas.width / map[0].length, ch = canvas.height / map.length;
  map.forEach((row, y) => row.forEach((v, x) => {
    ctx.fillStyle = `rgba(255,0,0,${(0.85 * v / peak).toFixed(3)})`;
    ctx.fillRect(x * cw, y * ch, cw + 0.5, ch + 0.5);
  }));
  $("bars").replaceChildren(...answer.classes.map((c) => {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.dataset.name = c.name;
    bar.dataset.probability = c.probability;
    const name = document.createElement("span");
    name.textContent = c.name;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * c.probability).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * c.probability).toFixed(1)}%`;
    bar.append(name, track, value);
    return bar;
  }));
  document.body.dataset.state = "classified";
}

// ---- generation ---------------------------------------------------------------------------------

function setUpGenerator(card) {
  $("generator").hidden = false;
  const cap = card.server_limits.max_new_tokens_cap;
  $("tokens").max = cap;
  $("tokens").value = Math.min(Number($("tokens").value), cap);
  $("prompt").value = "First Citizen:";
  $("attention-head").addEventListener("change", drawAttention);
  let controller = null;
  $("generate").addEventListener("click", async () => {
    showError("");
    controller = new AbortController();
    $("generate").disabled = true;
    $("stop").disabled = false;
    try {
      const text = await generate(controller.signal);
      if (text !== null && card.attention) await showAttention(text);
    } catch (e) {
      if (e.name !== "AbortError") showError(e.message);
    } finally {
      $("generate").disabled = false;
      $("stop").disabled = true;
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
}

async function generate(signal) {
  const body = {
    prompt: $("prompt").value, max_new_tokens: Number($("tokens").value),
    temperature: Number($("temperature").value), seed: Number($("seed").value), stream: true,
  };
  const response = await api("v1/generate", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal,
  });
  const out = $("output");
  out.textContent = body.prompt;
  document.body.dataset.state = "generating";
  delete document.body.dataset.attention;
  $("attention").hidden = true; // a map belongs to the text it was computed on
  let finished = null; // the whole text, once the server says the generation is done
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event.type === "done") {
        out.textContent = finished = event.data.text;
        document.body.dataset.state = "generated";
      } else {
        out.textContent += event.data.text;
      }
    }
  }
  return finished;
}

// ---- the attention map of the last token --------------------------------------------------------

let attention = null; // the last v1/attention answer

async function showAttention(text) {
  const response = await api("v1/attention", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({text}),
  });
  attention = await response.json();
  const select = $("attention-head");
  const chosen = select.value || "mean";
  const options = [["mean", "mean of heads"]];
  for (let h = 0; h < attention.heads; h++) options.push([String(h), `head ${h + 1}`]);
  select.replaceChildren(...options.map(([value, label]) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label;
    return option;
  }));
  select.value = options.some(([value]) => value === chosen) ? chosen : "mean";
  $("attention").hidden = false;
  drawAttention();
  document.body.dataset.attention = "shown";
}

function drawAttention() {
  if (!attention) return;
  const head = $("attention-head").value;
  const rows = head === "mean" ? attention.mean_of_heads : attention.per_head.map((layer) => layer[Number(head)]);
  const shown = (token) => token === " " ? "\u00b7" : token === "\n" ? "\u21b5" : token;
  $("attention-map").replaceChildren(...rows.map((weights, layer) => {
    const row = document.createElement("div");
    row.className = "attn-layer";
    row.dataset.layer = layer;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `layer ${layer + 1}`;
    const peak = Math.max(...weights) || 1;
    row.append(label, ...weights.map((w, i) => {
      const cell = document.createElement("span");
      cell.className = "attn-tok";
      cell.dataset.weight = w;
      cell.title = `${JSON.stringify(attention.tokens[i])}: ${(100 * w).toFixed(1)}%`;
      cell.textContent = shown(attention.tokens[i]);
      cell.style.background = `rgba(192,57,43,${(w / peak).toFixed(3)})`;
      return cell;
    }));
    return row;
  }));
}

function parseEvent(block) {
  const event = {type: "message", data: null};
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) event.type = line.slice(7);
    if (line.startsWith("data: ")) event.data = JSON.parse(line.slice(6));
  }
  return event;
}

loadCard().catch((e) => showError(`the model card did not load: ${e.message}`));
