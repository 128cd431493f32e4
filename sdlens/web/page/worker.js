// The model, run in a web worker (the page stays responsive): text encoder, UNet with its
// cross-attention maps, DPM-Solver++ (2M) with the coefficients sdlens exported, VAE decoder.
// Messages in:  {type: "init"} | {type: "run", id, ids, targets, seed, steps, guidance}
// Messages out: {type: "ready", meta} | {type: "progress", id, done, total, phase}
//               | {type: "result", id, result} | {type: "error", id, message}
import * as ort from "./ort.wasm.min.mjs";

ort.env.wasm.wasmPaths = new URL("./", import.meta.url).href;
// Threads need a cross-origin-isolated page (COOP/COEP headers), which a plain static server does not send.
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

let meta = null;
let sessions = null;
let noise = null;

async function init() {
  meta = await (await fetch("model.json")).json();
  const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  const [text, unet, vae] = await Promise.all(
    ["text_encoder.onnx", "unet.onnx", "vae_decoder.onnx"].map((f) => ort.InferenceSession.create(f, opts)),
  );
  sessions = { text, unet, vae };
  noise = new Float32Array(await (await fetch(meta.noise.file)).arrayBuffer());
  return meta;
}

// Bilinear resize of a (h, w) grid to (H, W), as torch's F.interpolate(mode="bilinear", align_corners=False).
function upsample(grid, h, w, H, W) {
  if (h === H && w === W) return Float32Array.from(grid);
  const out = new Float32Array(H * W);
  const sy = h / H, sx = w / W;
  for (let y = 0; y < H; y++) {
    const fy = Math.max((y + 0.5) * sy - 0.5, 0);
    const y0 = Math.floor(fy), y1 = y0 < h - 1 ? y0 + 1 : y0, ly = fy - y0;
    for (let x = 0; x < W; x++) {
      const fx = Math.max((x + 0.5) * sx - 0.5, 0);
      const x0 = Math.floor(fx), x1 = x0 < w - 1 ? x0 + 1 : x0, lx = fx - x0;
      out[y * W + x] = (1 - ly) * ((1 - lx) * grid[y0 * w + x0] + lx * grid[y0 * w + x1])
        + ly * ((1 - lx) * grid[y1 * w + x0] + lx * grid[y1 * w + x1]);
    }
  }
  return out;
}

// One step's maps of each target (a word, or the start/end/padding slots): the mean over its slots
// of each map-size group, upsampled to the picture and averaged over layers (each group weighs by
// its number of layers); and the target's share: its slots' summed attention, averaged over pixels.
function targetMaps(groups, targets, slots, H, W) {
  const nLayers = meta.mapGroups.reduce((s, g) => s + g.layers, 0);
  const maps = {}, shares = {};
  for (const t of targets) {
    const acc = new Float32Array(H * W);
    let share = 0;
    meta.mapGroups.forEach((g, gi) => {
      const [h, w] = g.size, data = groups[gi];
      const mean = new Float32Array(h * w);
      let mass = 0;
      for (let q = 0; q < h * w; q++) {
        let s = 0;
        for (const k of t.slots) s += data[q * slots + k];
        mean[q] = s / t.slots.length;
        mass += s;
      }
      const up = upsample(mean, h, w, H, W);
      for (let i = 0; i < H * W; i++) acc[i] += (g.layers / nLayers) * up[i];
      share += (g.layers / nLayers) * (mass / (h * w));
    });
    maps[t.label] = acc;
    shares[t.label] = share;
  }
  return { maps, shares };
}

function rgba(pixels, index, H, W) {
  // pixels: (n, 3, H, W) in [0, 1] → RGBA bytes of picture `index`, rounded as PIL does from numpy
  const out = new Uint8ClampedArray(H * W * 4), plane = H * W, base = index * 3 * plane;
  for (let i = 0; i < plane; i++) {
    out[4 * i] = Math.round(pixels[base + i] * 255);
    out[4 * i + 1] = Math.round(pixels[base + plane + i] * 255);
    out[4 * i + 2] = Math.round(pixels[base + 2 * plane + i] * 255);
    out[4 * i + 3] = 255;
  }
  return out;
}

function ids64(rows) {
  return new ort.Tensor("int64", BigInt64Array.from(rows.flat().map((i) => BigInt(i))), [rows.length, meta.slots]);
}

async function run(msg, progress) {
  const { ids, targets, seed, steps, guidance } = msg;
  const sched = meta.schedules[String(steps)];
  if (!sched) throw new Error(`steps must be 1 to ${Object.keys(meta.schedules).length}; got ${steps}`);
  if (!(seed >= 0 && seed < meta.noise.seeds && Number.isInteger(seed))) {
    throw new Error(`seed must be a whole number from 0 to ${meta.noise.seeds - 1}; got ${seed}`);
  }
  const cfg = guidance > 1; // as diffusers: guidance 1 (or less) runs the prompt alone
  const [c, h, w] = meta.latent, n = c * h * w;
  const empty = [meta.ids.start, meta.ids.end, ...Array(meta.slots - 2).fill(meta.ids.pad)];
  const text = await sessions.text.run({ ids: ids64(cfg ? [empty, ids] : [ids]) });
  const context = text.context;
  let x = noise.slice(seed * n, (seed + 1) * n);
  let prev = null;
  const x0s = new Float32Array(steps * n);
  const stepGroups = [];
  for (let i = 0; i < steps; i++) {
    const batch = cfg ? 2 : 1;
    const sample = new Float32Array(batch * n);
    for (let b = 0; b < batch; b++) sample.set(x, b * n);
    const out = await sessions.unet.run({
      sample: new ort.Tensor("float32", sample, [batch, c, h, w]),
      timestep: new ort.Tensor("float32", Float32Array.of(sched.timestep[i]), [1]),
      context,
    });
    const eps = out.eps.data;
    const alpha = sched.alpha[i], sigma = sched.sigma[i];
    const m0 = new Float32Array(n), next = new Float32Array(n);
    for (let j = 0; j < n; j++) {
      const e = cfg ? eps[j] + guidance * (eps[n + j] - eps[j]) : eps[j];
      m0[j] = (x[j] - sigma * e) / alpha;
      next[j] = sched.A[i] * x[j] + sched.B[i] * m0[j] + (sched.C[i] ? sched.C[i] * prev[j] : 0);
    }
    x0s.set(m0, i * n);
    prev = m0;
    x = next;
    stepGroups.push(meta.mapGroups.map((g) => Float32Array.from(out[g.output].data)));
    progress(i + 1, steps + 1, "denoising");
  }
  // the final latent, then every step's clean estimate, in one decoder call
  const latents = new Float32Array((steps + 1) * n);
  latents.set(x, 0);
  latents.set(x0s, n);
  const decoded = (await sessions.vae.run({ latents: new ort.Tensor("float32", latents, [steps + 1, c, h, w]) })).image;
  progress(steps + 1, steps + 1, "decoding");
  const [H, W] = decoded.dims.slice(2);
  const pixels = decoded.data;
  // per step: the word maps and shares, and the clean-picture estimate x0 (RGBA)
  const perStep = stepGroups.map((groups, i) => ({ ...targetMaps(groups, targets, meta.slots, H, W), x0: rgba(pixels, i + 1, H, W) }));
  const maps = {}, shares = {};
  for (const t of targets) {
    const acc = new Float32Array(H * W);
    let share = 0;
    for (const s of perStep) {
      const m = s.maps[t.label];
      for (let k = 0; k < H * W; k++) acc[k] += m[k] / steps;
      share += s.shares[t.label] / steps;
    }
    maps[t.label] = acc;
    shares[t.label] = share;
  }
  return {
    width: W, height: H, image: rgba(pixels, 0, H, W), mapSize: [H, W],
    words: targets.filter((t) => t.kind === "word").map((t) => t.label),
    targets: targets.map((t) => ({ label: t.label, kind: t.kind })),
    maps, shares, steps: perStep, timesteps: sched.timestep.slice(),
  };
}

self.onmessage = async (e) => {
  const msg = e.data;
  try {
    if (msg.type === "init") {
      const m = await init();
      self.postMessage({ type: "ready", meta: { vocabulary: m.vocabulary, defaults: m.defaults, seeds: m.noise.seeds,
        maxSteps: Object.keys(m.schedules).length, slots: m.slots, ids: m.ids, image: m.image } });
    } else if (msg.type === "run") {
      const t0 = performance.now();
      const result = await run(msg, (done, total, phase) => self.postMessage({ type: "progress", id: msg.id, done, total, phase }));
      result.seconds = (performance.now() - t0) / 1000;
      self.postMessage({ type: "result", id: msg.id, result });
    }
  } catch (err) {
    self.postMessage({ type: "error", id: msg.id, message: String(err && err.message ? err.message : err) });
  }
};
