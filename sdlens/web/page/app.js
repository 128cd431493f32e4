// The page: a prompt in the model's own words, the picture, one heat map per word with its share of
// the attention, and a step slider. window.sdlensDemo.run({prompt, seed, steps, guidance}) is the
// same pipeline for scripts and tests; it resolves to {width, height, image (RGBA), words, maps
// {word: Float32Array (H·W)}, shares, mapSize [H, W], steps: [{maps, shares, x0 (RGBA)}], timesteps, seconds}.
const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
const pending = new Map();
let nextId = 0;
let meta = null;
let last = null; // the last result shown
const ready = new Promise((resolve, reject) => {
  pending.set("init", { resolve, reject });
});
worker.onmessage = (e) => {
  const m = e.data;
  if (m.type === "ready") {
    meta = m.meta;
    pending.get("init").resolve(meta);
  } else if (m.type === "progress") {
    const p = pending.get(m.id);
    if (p && p.onProgress) p.onProgress(m.done, m.total, m.phase);
  } else if (m.type === "result" || m.type === "error") {
    const p = pending.get(m.type === "error" && m.id === undefined ? "init" : m.id);
    if (!p) return;
    pending.delete(m.id);
    if (m.type === "result") p.resolve(m.result);
    else p.reject(new Error(m.message));
  }
};
worker.onerror = (e) => {
  for (const p of pending.values()) p.reject(new Error(e.message || "the model's worker failed to start"));
};
worker.postMessage({ type: "init" });

// ------------------------------------------------------------------------------------------ words
const PUNCT = /^([,.]*)(.*?)([,.]*)$/;

// The prompt as CLIP's tokenizer cuts it, for the words this model knows: each whitespace-separated
// word (lower case) is its tokens, "circle," being "circle" then ",". Returns {ids, targets, unknown}.
export function tokenize(prompt) {
  const pieces = prompt.toLowerCase().split(/\s+/).filter(Boolean);
  const ids = [meta.ids.start];
  const words = [], unknown = [];
  for (const piece of pieces) {
    const [, lead, core, trail] = piece.match(PUNCT);
    const parts = [...lead, ...(core ? [core] : []), ...trail];
    const slots = [];
    for (const part of parts) {
      const known = meta.vocabulary[part];
      if (!known) { unknown.push(core || part); continue; }
      for (const id of known) { slots.push(ids.length); ids.push(id); }
    }
    if (slots.length) words.push({ word: piece, slots });
  }
  const nReal = ids.length + 1;
  if (nReal > meta.slots) return { unknown, tooLong: true };
  ids.push(meta.ids.end);
  while (ids.length < meta.slots) ids.push(meta.ids.pad);
  const counts = {}, seen = {};
  for (const w of words) counts[w.word] = (counts[w.word] || 0) + 1;
  const targets = words.map((w) => {
    seen[w.word] = (seen[w.word] || 0) + 1;
    return { label: counts[w.word] > 1 ? `${w.word} (${seen[w.word]})` : w.word, slots: w.slots, kind: "word" };
  });
  targets.push({ label: "<start>", slots: [0], kind: "start" });
  targets.push({ label: "<end>", slots: [nReal - 1], kind: "end" });
  const pad = [];
  for (let s = nReal; s < meta.slots; s++) pad.push(s);
  if (pad.length) targets.push({ label: "<pad>", slots: pad, kind: "pad" });
  return { ids, targets, unknown: [...new Set(unknown)] };
}

function vocabularyNote(unknown) {
  const words = Object.keys(meta.vocabulary).filter((w) => /\w/.test(w));
  const list = unknown.map((w) => `“${w}”`).join(", ");
  return `${list} ${unknown.length > 1 ? "are not words" : "is not a word"} this model knows: it learnt only the ` +
    `words of its shapes world (${words.join(", ")}). Take ${unknown.length > 1 ? "them" : "it"} out or use one of these.`;
}

// ------------------------------------------------------------------------------------------ the API
async function run({ prompt, seed = 0, steps = null, guidance = null, onProgress = null } = {}) {
  await ready;
  steps = steps ?? meta.defaults.steps;
  guidance = guidance ?? meta.defaults.guidance;
  const tok = tokenize(String(prompt ?? ""));
  if (tok.tooLong) throw new Error(`the prompt is too long: the text encoder reads ${meta.slots - 2} tokens`);
  if (tok.unknown.length) throw new Error(vocabularyNote(tok.unknown));
  if (!tok.targets.some((t) => t.kind === "word")) throw new Error("the prompt is empty: write a few of the model's words");
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject, onProgress });
    worker.postMessage({ type: "run", id, ids: tok.ids, targets: tok.targets, seed: Number(seed), steps: Number(steps),
      guidance: Number(guidance) });
  });
}

window.sdlensDemo = { run, tokenize: (p) => ready.then(() => tokenize(p)), ready };

// ------------------------------------------------------------------------------------------ drawing
const $ = (id) => document.getElementById(id);

function putRGBA(canvas, rgba, W, H) {
  canvas.width = W;
  canvas.height = H;
  canvas.getContext("2d").putImageData(new ImageData(rgba, W, H), 0, 0);
}

// A colour scale without the world's object colours (red, green, blue), so that no object looks
// "hot" by its own colour: dark to light grey-violet.
function heatRGBA(map, lo, hi) {
  const out = new Uint8ClampedArray(map.length * 4);
  const span = hi > lo ? hi - lo : 1;
  for (let i = 0; i < map.length; i++) {
    const v = Math.min(1, Math.max(0, (map[i] - lo) / span));
    out[4 * i] = 20 + 235 * v;
    out[4 * i + 1] = 20 + 215 * v * v;
    out[4 * i + 2] = 40 + 200 * Math.sqrt(v);
    out[4 * i + 3] = 255;
  }
  return out;
}

function fmtShare(s) {
  return s >= 0.095 ? `${Math.round(s * 100)}%` : `${(s * 100).toFixed(1)}%`;
}

function drawMaps(result, stepIndex) {
  const src = stepIndex < 0 ? result : result.steps[stepIndex];
  const grid = $("maps");
  grid.innerHTML = "";
  const scale = $("scale").value;
  const words = result.targets.filter((t) => t.kind === "word" || $("specials").checked);
  let lo = Infinity, hi = -Infinity;
  if (scale === "shared") { // the words share a scale; start, end and padding (summed) keep their own
    for (const t of words) {
      if (t.kind !== "word") continue;
      for (const v of src.maps[t.label]) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
  }
  for (const t of words) {
    const m = src.maps[t.label];
    let a = lo, b = hi;
    if (scale === "each" || t.kind !== "word") { a = Math.min(...m); b = Math.max(...m); }
    const fig = document.createElement("figure");
    fig.className = "map";
    fig.dataset.word = t.label;
    const c = document.createElement("canvas");
    putRGBA(c, heatRGBA(m, a, b), result.width, result.height);
    const cap = document.createElement("figcaption");
    cap.innerHTML = `<b>${t.label}</b> ${fmtShare(src.shares[t.label])}`;
    cap.title = t.kind === "word"
      ? `${fmtShare(src.shares[t.label])} of each pixel's attention goes to “${t.label}” on average`
      : "a slot that is not a word of the prompt";
    fig.append(c, cap);
    grid.append(fig);
  }
  $("legend").textContent = scale === "shared"
    ? `The words on one scale: dark = ${fmtShare(Math.max(lo, 0))}, light = ${fmtShare(hi)} of a pixel's attention` +
      ($("specials").checked ? "; the start, end and padding maps each on their own." : ".")
    : "Each map on its own scale: dark = its smallest value, light = its largest.";
  const pad = ["<start>", "<end>", "<pad>"].reduce((s, k) => s + (src.shares[k] || 0), 0);
  $("special-share").textContent = `${fmtShare(pad)} of the attention goes to the start, end and padding slots, not to a word.`;
}

function showStep(i) {
  if (!last) return;
  const n = last.steps.length;
  const all = i >= n;
  $("step-label").textContent = all ? `all ${n} steps (averaged)` : `step ${i + 1} of ${n} (timestep ${last.timesteps[i]})`;
  if (all) putRGBA($("x0"), last.image, last.width, last.height);
  else putRGBA($("x0"), last.steps[i].x0, last.width, last.height);
  $("x0-note").textContent = all
    ? "The finished picture."
    : "What the model expects the clean picture to be at this step: early steps guess a blur, later ones settle.";
  drawMaps(last, all ? -1 : i);
}

function show(result) {
  last = result;
  putRGBA($("picture"), result.image, result.width, result.height);
  const slider = $("step");
  slider.max = String(result.steps.length);
  slider.value = slider.max;
  slider.disabled = false;
  $("play").disabled = false;
  showStep(result.steps.length);
  $("timing").textContent = `${result.seconds.toFixed(1)} s in your browser`;
}

// ------------------------------------------------------------------------------------------ controls
let playing = null;

async function generate() {
  const prompt = $("prompt").value;
  const message = $("message");
  message.textContent = "";
  const bar = $("progress");
  $("generate").disabled = true;
  try {
    const result = await run({
      prompt, seed: parseInt($("seed").value, 10), steps: parseInt($("steps").value, 10),
      guidance: parseFloat($("guidance").value),
      onProgress: (done, total) => { bar.value = done / total; },
    });
    show(result);
  } catch (err) {
    message.textContent = err.message;
  } finally {
    $("generate").disabled = false;
    bar.value = 0;
  }
}

function checkWords() {
  if (!meta) return;
  const tok = tokenize($("prompt").value);
  $("message").textContent = tok.unknown && tok.unknown.length ? vocabularyNote(tok.unknown) : "";
}

function suggest() {
  const list = $("vocabulary");
  const words = Object.keys(meta.vocabulary).filter((w) => /\w/.test(w));
  const typed = $("prompt").value;
  const head = typed.replace(/\S*$/, "");
  list.innerHTML = "";
  for (const w of words) {
    const o = document.createElement("option");
    o.value = head + w;
    list.append(o);
  }
  $("words").textContent = words.join(" · ");
}

ready.then(() => {
  $("seed").max = String(meta.seeds - 1);
  $("steps").max = String(meta.maxSteps);
  $("steps").value = String(meta.defaults.steps);
  $("guidance").value = String(meta.defaults.guidance);
  suggest();
  $("generate").disabled = false;
  $("status").textContent = "Ready: the model runs on this computer, in this page.";
}).catch((err) => { $("status").textContent = `The model could not start: ${err.message}`; });

$("generate").addEventListener("click", generate);
$("prompt").addEventListener("input", () => { suggest(); checkWords(); });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter") generate(); });
$("step").addEventListener("input", (e) => showStep(parseInt(e.target.value, 10)));
$("scale").addEventListener("change", () => showStep(parseInt($("step").value, 10)));
$("specials").addEventListener("change", () => showStep(parseInt($("step").value, 10)));
$("play").addEventListener("click", () => {
  if (playing) { clearInterval(playing); playing = null; $("play").textContent = "▶ play"; return; }
  const slider = $("step");
  let i = 0;
  $("play").textContent = "■ stop";
  playing = setInterval(() => {
    slider.value = String(i);
    showStep(i);
    i += 1;
    if (i > last.steps.length) { clearInterval(playing); playing = null; $("play").textContent = "▶ play"; }
  }, 250);
});
