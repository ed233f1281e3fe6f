// The personal_vlm web console: the live view with detections, teach by drawing a box, the
// library, ask with a streamed answer, and the frame path's health. Plain JavaScript, no build.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const view = $("view");
const ctx = view.getContext("2d");
const BOX_COLOUR = "#ff00ff";           // the box being drawn (tests look for it on a screenshot)
const HEALTH_ROWS = [
  ["processed_hz", "processed frames/s"], ["received_hz", "camera frames/s"], ["max_rate_hz", "rate limit /s"],
  ["latency_ms", "camera → detections (ms)"], ["encode_ms", "encoder (ms)"], ["dropped_frames", "dropped frames"],
  ["unreadable_frames", "unreadable frames"], ["failed_frames", "failed frames"],
  ["unverified_matches", "unverified (over budget)"], ["concepts", "concepts"], ["camera_topic", "camera"],
  ["model", "model"], ["device", "device"],
];

// What the page shows and measured; tests read it.
const state = {
  connected: false, connections: 0, frames: 0, fps: 0, latencyMs: 0, concepts: [], health: null,
  asking: false, answer: "", box: null, held: null, loadedAt: performance.now(),
};
window.consoleState = state;

let socket = null;
let retryMs = 500;
let current = null;          // the newest frame: {seq, width, height, detections, captured, bitmap}
let held = null;             // the frame a box is drawn on: the view stays on it until Teach or Clear
let drag = null;
const decidedBy = {};         // concept -> the stage (match, ego, r2p) that decided its latest detection
const frameTimes = [];
const latencies = [];

function withToken(url) {
  return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
}

async function api(path, body) {
  const options = { headers: token ? { Authorization: "Bearer " + token } : {} };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  try {
    const response = await fetch(path, options);
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch (error) {
      return { success: false, message: `HTTP ${response.status}: ${text.trim()}` };
    }
  } catch (error) {
    return { success: false, message: "the node cannot be reached: " + error.message };
  }
}

function say(id, text, kind) {
  const element = $(id);
  element.textContent = text || "";
  element.className = "result" + (kind ? " " + kind : "");
}

// ---- the websocket, reconnecting ----------------------------------------------------------------
function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  socket = new WebSocket(scheme + location.host + withToken("/ws"));
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    retryMs = 500;
    state.connected = true;
    state.connections += 1;
    setConnection("connected", "ok");
    loadLibrary();
  };
  socket.onclose = () => {
    state.connected = false;
    if (state.asking) finishAsk({ success: false, message: "the connection dropped; ask again" });
    setConnection(`reconnecting in ${(retryMs / 1000).toFixed(1)} s…`, "warn");
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 5000);
  };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") onMessage(JSON.parse(event.data));
    else onFrame(event.data);
  };
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function setConnection(text, kind) {
  const element = $("connection");
  element.textContent = text;
  element.className = "state " + kind;
}

function onMessage(message) {
  if (message.type === "health") showHealth(message);
  else if (message.type === "concepts") loadLibrary();
  else if (message.type === "answer") onAnswer(message);
  else if (message.type === "error") say("answer-note", message.message, "bad");
}

// ---- the live view ----------------------------------------------------------------------------
async function onFrame(buffer) {
  const length = new DataView(buffer).getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, length)));
  const jpeg = new Blob([new Uint8Array(buffer, 4 + length)], { type: "image/jpeg" });
  const bitmap = await createImageBitmap(jpeg);
  if (current && current !== held) current.bitmap.close();
  current = { ...header, bitmap };
  const now = performance.now();
  frameTimes.push(now);
  while (frameTimes.length > 2 && now - frameTimes[0] > 3000) frameTimes.shift();
  latencies.push(Date.now() - header.captured * 1000);
  while (latencies.length > 20) latencies.shift();
  state.frames += 1;
  state.fps = frameTimes.length > 1 ? (1000 * (frameTimes.length - 1)) / (now - frameTimes[0]) : 0;
  state.latencyMs = latencies.reduce((a, b) => a + b, 0) / latencies.length;
  state.lastDetections = header.detections;
  for (const d of header.detections) {
    if (decidedBy[d.name] !== d.source) {
      decidedBy[d.name] = d.source;
      showDecided(d.name);
    }
  }
  state.lastSeq = header.seq;
  if (state.firstFrameMs === undefined) state.firstFrameMs = now - state.loadedAt;
  $("view-stats").textContent = `view ${state.fps.toFixed(1)} frames/s, ${state.latencyMs.toFixed(0)} ms behind the camera`;
  if (!held) draw();
}

function colourOf(name) {
  let hash = 0;
  for (const c of name) hash = (hash * 31 + c.codePointAt(0)) >>> 0;
  return `hsl(${hash % 360}, 85%, 55%)`;
}

function draw() {
  const frame = held || current;
  if (!frame) return;
  if (view.width !== frame.width || view.height !== frame.height) {
    view.width = frame.width;
    view.height = frame.height;
  }
  ctx.drawImage(frame.bitmap, 0, 0);
  const line = Math.max(2, Math.round(frame.width / 320));
  ctx.font = `${Math.max(11, Math.round(frame.width / 45))}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of frame.detections) {
    const [x, y, w, h] = d.box;
    const colour = colourOf(d.name);
    ctx.strokeStyle = colour;
    ctx.lineWidth = line;
    ctx.strokeRect(x, y, w, h);
    const label = `${d.name} ${d.score.toFixed(2)} #${d.track_id} ${d.source}`;
    const width = ctx.measureText(label).width + 6;
    const height = parseInt(ctx.font, 10) + 4;
    const top = y >= height ? y - height : y;
    ctx.fillStyle = colour;
    ctx.fillRect(x, top, width, height);
    ctx.fillStyle = "#000";
    ctx.fillText(label, x + 3, top + 2);
  }
  const box = state.box;
  if (box) {
    ctx.strokeStyle = BOX_COLOUR;
    ctx.lineWidth = line + 1;
    ctx.strokeRect(box[0], box[1], box[2], box[3]);
  }
}

function framePoint(event) {
  const rect = view.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * view.width) / rect.width;
  const y = ((event.clientY - rect.top) * view.height) / rect.height;
  return [Math.min(Math.max(x, 0), view.width), Math.min(Math.max(y, 0), view.height)];
}

function hold(frame) {
  held = frame;
  state.held = frame.seq;
  send({ type: "hold", frame: frame.seq });
}

function release() {
  if (held) send({ type: "release" });
  if (held && held !== current) held.bitmap.close();
  held = null;
  state.held = null;
  state.box = null;
  draw();
}

view.addEventListener("pointerdown", (event) => {
  if (!held && !current) return;
  if (!held) hold(current);
  drag = framePoint(event);
  state.box = [Math.round(drag[0]), Math.round(drag[1]), 0, 0];
  view.setPointerCapture(event.pointerId);
  draw();
});

view.addEventListener("pointermove", (event) => {
  if (!drag) return;
  const [x, y] = framePoint(event);
  const left = Math.round(Math.min(x, drag[0]));
  const top = Math.round(Math.min(y, drag[1]));
  state.box = [left, top, Math.round(Math.max(x, drag[0])) - left, Math.round(Math.max(y, drag[1])) - top];
  draw();
});

view.addEventListener("pointerup", () => {
  drag = null;
});

// ---- teaching ----------------------------------------------------------------------------------
async function teach(name, add) {
  const buttons = [$("teach"), $("add-view")];
  buttons.forEach((b) => (b.disabled = true));
  say("teach-result", add ? `adding a view to ${name}…` : `teaching ${name}…`);
  const reply = await api("/api/teach", {
    name, add, category: add ? "" : $("teach-category").value, box: state.box, frame: held ? held.seq : null,
  });
  buttons.forEach((b) => (b.disabled = false));
  say("teach-result", reply.message, reply.success ? "good" : "bad");
  if (reply.success) {
    release();
    if (!add) $("teach-name").value = "";
    loadLibrary();
  }
}

$("teach-form").addEventListener("submit", (event) => {
  event.preventDefault();
  teach($("teach-name").value, false);
});
$("add-view").addEventListener("click", () => teach($("add-to").value, true));
$("clear-box").addEventListener("click", () => {
  release();
  say("teach-result", "");
});

// ---- the library ------------------------------------------------------------------------------
async function loadLibrary() {
  const reply = await api("/api/concepts");
  if (!reply.success) {
    say("library-result", reply.message, "bad");
    return;
  }
  state.concepts = reply.concepts;
  $("library-count").textContent = `(${reply.concepts.length})`;
  const select = $("add-to");
  const chosen = select.value;
  select.replaceChildren(...reply.concepts.map((c) => new Option(c.name, c.name)));
  if (reply.concepts.some((c) => c.name === chosen)) select.value = chosen;
  $("library").replaceChildren(...reply.concepts.map(conceptCard));
}

function thumbnail(concept, index) {
  const canvas = document.createElement("canvas");
  const picture = new Image();
  picture.onload = () => {
    canvas.width = picture.naturalWidth;
    canvas.height = picture.naturalHeight;
    const c = canvas.getContext("2d");
    c.drawImage(picture, 0, 0);
    const roi = concept.rois[index];
    if (roi) {
      c.strokeStyle = colourOf(concept.name);
      c.lineWidth = Math.max(2, Math.round(picture.naturalWidth / 100));
      c.strokeRect(roi[0], roi[1], roi[2], roi[3]);
    }
  };
  picture.src = withToken(`/api/picture?name=${encodeURIComponent(concept.name)}&index=${index}`);
  canvas.title = `reference picture ${index + 1}`;
  return canvas;
}

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function conceptCard(concept) {
  const card = element("div", "concept");
  card.dataset.name = concept.name;
  const pictures = element("div", "pictures");
  for (let i = 0; i < Math.min(concept.pictures, 4); i++) pictures.append(thumbnail(concept, i));
  const about = element("div");
  about.append(element("div", "name", concept.name + (concept.category ? ` (${concept.category})` : "")));
  about.append(element("div", "meta", `keywords: ${concept.keywords.join(", ") || "-"}`));
  about.append(element("div", "meta", `${concept.memory_tokens} memory tokens from ${concept.pictures} ` +
    `picture(s); accept ≥ ${concept.accept}; fingerprint ${concept.fingerprint}`));
  if (concept.decided_by && !decidedBy[concept.name]) decidedBy[concept.name] = concept.decided_by;
  about.append(element("div", "meta", concept.state));
  about.append(element("div", "meta decided", decidedText(concept.name)));
  const forget = element("button", "forget", "Forget");
  forget.addEventListener("click", () => confirmForget(about, forget, concept.name));
  about.append(forget);
  card.append(pictures, about);
  return card;
}

function showDecided(name) {
  const card = [...document.querySelectorAll(".concept")].find((c) => c.dataset.name === name);
  if (!card) return;
  card.querySelector(".decided").textContent = decidedText(name);
}

function decidedText(name) {
  const stage = { match: "the matcher (match)", ego: "Ego's in-context check (ego)", r2p: "R2P's reasoning (r2p)" };
  const source = decidedBy[name];
  return source ? `decided by ${stage[source] || source}` : "not seen on the live view yet";
}

function confirmForget(about, button, name) {
  const question = element("span", "forget-confirm", ` Forget ${name} and all its pictures? `);
  const yes = element("button", "forget-yes", "Yes, forget");
  const no = element("button", "forget-no", "Keep");
  button.replaceWith(question, yes, no);
  no.addEventListener("click", () => {
    question.remove();
    yes.remove();
    no.replaceWith(button);
  });
  yes.addEventListener("click", async () => {
    yes.disabled = no.disabled = true;
    const reply = await api("/api/forget", { name });
    if (reply.success) delete decidedBy[name];
    say("library-result", reply.message, reply.success ? "good" : "bad");
    loadLibrary();
  });
}

// ---- ask ------------------------------------------------------------------------------------------
$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.asking) return;
  if (!state.connected) {
    say("answer-note", "not connected to the node yet", "bad");
    return;
  }
  state.asking = true;
  state.answer = "";
  $("answer").textContent = "";
  $("stop").disabled = false;
  $("ask").disabled = true;
  say("answer-note", "thinking…");
  send({ type: "ask", question: $("question").value });
});
$("stop").addEventListener("click", () => send({ type: "stop" }));

function onAnswer(message) {
  if (!message.done) {
    state.answer = message.text;
    $("answer").textContent = message.text;
    return;
  }
  finishAsk(message);
}

function finishAsk(message) {
  state.asking = false;
  $("stop").disabled = true;
  $("ask").disabled = false;
  if (message.answer !== undefined) {
    state.answer = message.answer;
    $("answer").textContent = message.answer;
  }
  state.lastAsk = message;
  if (!message.success) say("answer-note", message.message, "bad");
  else if (message.stopped) say("answer-note", "stopped", "");
  else say("answer-note", `${message.message}; concepts in context: ${message.concepts.join(", ") || "none"}`, "good");
}

// ---- the frame path's health ---------------------------------------------------------------------
function showHealth(health) {
  state.health = health;
  const message = $("health-message");
  message.textContent = `${health.level}: ${health.message}`;
  message.className = "state " + health.level.toLowerCase();
  const rows = HEALTH_ROWS.filter(([key]) => key in health.values).map(([key, label]) => [label, health.values[key]]);
  rows.push(["verification budget", health.verification
    ? `${health.verifications_per_second} /s, ≤ ${Math.round(health.verification_busy_fraction * 100)}% of the time`
    : "off"]);
  $("health").replaceChildren(...rows.map(([label, value]) => {
    const row = document.createElement("tr");
    row.append(element("td", "", label), element("td", "", String(value)));
    return row;
  }));
}

connect();
