// nanovl's page: a document, its pages and tile grid; ask (streamed), extract (evidence boxes), convert.
// It uses the server's own HTTP API, like any client; the API key (if the server asks for one) is kept in
// sessionStorage, so it lasts for this tab only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { doc: null, pages: [], current: 0, boxes: [] };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function askForKey(message) {
  $("keyform").hidden = false;
  $("key").focus();
  showError(message);
}

async function api(path, body, stream = false) {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("nanovl-key");
  if (key) headers["Authorization"] = "Bearer " + key;
  const r = await fetch(path, { method: body === undefined ? "GET" : "POST", headers,
                                body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) {
    askForKey("The server needs an API key, and " + (key ? "this one is wrong." : "none was given."));
    throw new Error("unauthorised");
  }
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    showError(message);
    throw new Error(message);
  }
  return stream ? r : r.json();
}

async function loadModel() {
  try {
    const m = await api("/v1/models");
    $("model").textContent = m.data[0].id;
    showError("");
    $("keyform").hidden = true;
  } catch (e) { /* shown */ }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function openFile(file) {
  showError("");
  const dataUrl = await readFile(file);
  const isPdf = file.type === "application/pdf" || file.name.toLowerCase().endsWith(".pdf");
  state.doc = { name: file.name, dataUrl, isPdf };
  let answer;
  try { answer = await api("/v1/pages", { document: dataUrl, dpi: 96 }); } catch (e) { return; }
  state.pages = answer.pages;
  const thumbs = $("thumbs");
  thumbs.innerHTML = "";
  state.pages.forEach((p, i) => {
    const img = document.createElement("img");
    img.src = p.image;
    img.alt = "page " + p.page;
    img.className = "thumb";
    img.onclick = () => select(i);
    thumbs.appendChild(img);
  });
  select(0);
}

function select(i) {
  state.current = i;
  state.boxes = [];
  document.querySelectorAll("#thumbs img").forEach((t, k) => t.classList.toggle("selected", k === i));
  const p = state.pages[i];
  const img = $("page");
  img.onload = draw;
  img.src = p.image;
  const t = p.tiles;
  $("tileinfo").textContent = `page ${p.page}: ${t.grid[0]}x${t.grid[1]} grid${t.thumbnail ? " + thumbnail" : ""}` +
    ` = ${t.tiles} tiles, ${t.image_tokens} image tokens`;
}

function draw() {
  const img = $("page"), canvas = $("overlay"), p = state.pages[state.current];
  if (!p) return;
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  if ($("grid").checked) {
    const [cols, rows] = p.tiles.grid;
    g.strokeStyle = "rgba(74, 108, 247, 0.8)";
    g.lineWidth = 1;
    for (let c = 1; c < cols; c++) line(g, c * canvas.width / cols, 0, c * canvas.width / cols, canvas.height);
    for (let r = 1; r < rows; r++) line(g, 0, r * canvas.height / rows, canvas.width, r * canvas.height / rows);
    g.strokeRect(0.5, 0.5, canvas.width - 1, canvas.height - 1);
  }
  const scale = canvas.width / p.units[0];  // evidence boxes are in page units (points, or image pixels)
  for (const b of state.boxes) {
    g.strokeStyle = b.colour;
    g.lineWidth = 2;
    g.strokeRect(b.bbox[0] * scale, b.bbox[1] * scale, (b.bbox[2] - b.bbox[0]) * scale, (b.bbox[3] - b.bbox[1]) * scale);
  }
  canvas.dataset.boxes = String(state.boxes.length);
}

function line(g, x0, y0, x1, y1) {
  g.beginPath(); g.moveTo(x0, y0); g.lineTo(x1, y1); g.stroke();
}

function pageParts(text) {
  const d = state.doc, p = state.pages[state.current];
  const media = d.isPdf ? { type: "file", file: { file_data: d.dataUrl, pages: String(p.page) } }
                        : { type: "image_url", image_url: { url: d.dataUrl } };
  return [media, { type: "text", text }];
}

async function ask(event) {
  event.preventDefault();
  if (!state.doc) return showError("Open a document first.");
  const out = $("answer");
  out.textContent = "";
  let r;
  try {
    r = await api("/v1/chat/completions", { model: $("model").textContent, stream: true, max_tokens: 256,
      messages: [{ role: "user", content: pageParts($("question").value || "What is on this page?") }] }, true);
  } catch (e) { return; }
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0 || (cut = buffer.indexOf("\r\n\r\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^(\r?\n){2}/, "");
      for (const line of event.split(/\r?\n/)) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) return showError(chunk.error.message);
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (piece) out.textContent += piece;
      }
    }
  }
}

function colour(confidence) {
  return `hsl(${Math.round(120 * confidence)}, 70%, 38%)`;
}

async function extract(event) {
  event.preventDefault();
  if (!state.doc) return showError("Open a document first.");
  const p = state.pages[state.current];
  const body = { document: state.doc.dataUrl, pages: state.doc.isPdf ? String(p.page) : null };
  const schema = $("schema").value.trim();
  if (schema) {
    try { body.schema = JSON.parse(schema); } catch (e) { return showError("The schema is not JSON: " + e.message); }
  } else {
    body.fields = $("fields").value || "total";
  }
  let r;
  try { r = await api("/v1/extract", body); } catch (e) { return; }
  showFields(r.fields);
}

function showFields(fields) {
  const table = $("fieldtable");
  table.innerHTML = "";
  state.boxes = [];
  const leaves = [];
  (function walk(v, name) {
    if (v && typeof v === "object" && "value" in v && "confidence" in v) return leaves.push([name, v]);
    if (v && typeof v === "object") for (const k of Object.keys(v)) walk(v[k], name ? name + "." + k : k);
  })(fields, "");
  for (const [name, leaf] of leaves) {
    const tr = table.insertRow();
    tr.insertCell().textContent = name;
    tr.insertCell().textContent = JSON.stringify(leaf.value);
    const badge = document.createElement("span");
    badge.className = "conf";
    badge.style.background = colour(leaf.confidence);
    badge.textContent = leaf.confidence.toFixed(2);
    tr.insertCell().appendChild(badge);
    const e = leaf.evidence;
    tr.insertCell().textContent = e ? `page ${e.page}: "${e.text}"` : (leaf.no_evidence || "no evidence");
    if (e && e.page === state.pages[state.current].page) state.boxes.push({ bbox: e.bbox, colour: colour(leaf.confidence) });
  }
  draw();
}

async function convert(event) {
  event.preventDefault();
  if (!state.doc) return showError("Open a document first.");
  const p = state.pages[state.current];
  let r;
  try {
    r = await api("/v1/convert", { document: state.doc.dataUrl, pages: state.doc.isPdf ? String(p.page) : null,
                                   max_tokens: 1024 });
  } catch (e) { return; }
  $("markdown").innerHTML = r.pages[0].html;  // sanitised by the server (nh3)
}

$("file").onchange = (e) => e.target.files[0] && openFile(e.target.files[0]);
$("grid").onchange = draw;
$("askform").onsubmit = ask;
$("extractform").onsubmit = extract;
$("convertform").onsubmit = convert;
$("keyform").onsubmit = (e) => {
  e.preventDefault();
  sessionStorage.setItem("nanovl-key", $("key").value);
  loadModel();
};
window.onresize = draw;
for (const target of [$("thumbs"), document.body]) {
  target.addEventListener("dragover", (e) => { e.preventDefault(); $("thumbs").classList.add("over"); });
  target.addEventListener("drop", (e) => {
    e.preventDefault();
    $("thumbs").classList.remove("over");
    if (e.dataTransfer.files[0]) openFile(e.dataTransfer.files[0]);
  });
}
loadModel();
