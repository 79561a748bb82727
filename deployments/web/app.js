// ACE-Step web page: submit a job, follow it by its event stream, play and draw its outputs.
// Plain browser JavaScript, no build step and no external resources. Every URL is relative ("v1/..."), so the page
// works under a route prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "acestep.apiKey";
const JOBS_STORE = "acestep.jobs";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
// Rough share of a job's run done when it enters each stage (as deployments/upstream_api.py:STAGE_PROGRESS).
const STAGE_PROGRESS = {queued: 0, starting: 0.02, retry_wait: 0.02, encode_audio: 0.05, lm: 0.07, condition: 0.1,
                        diffusion: 0.15, decode: 0.9, write: 0.97, done: 1};
const SOURCE_TASKS = new Set(["cover", "repaint", "lego", "extract", "complete"]);  // those that read src_audio

let models = [];      // GET v1/models' entries
let shown = null;     // the job on screen: {id, abort: AbortController, urls: [object URLs], drawn}

// -- requests -----------------------------------------------------------------------------------------------------
class HttpError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? {Authorization: `Bearer ${key}`} : {};
}

// fetch() with the key; a non-2xx answer throws HttpError carrying the server's `detail`. A 401 shows the key field.
async function request(url, options = {}) {
  const response = await fetch(url, {...options, headers: {...authHeaders(), ...(options.headers || {})}});
  if (response.ok) return response;
  let detail = `${response.status} ${response.statusText}`;
  try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
  if (response.status === 401) askForKey(detail);
  throw new HttpError(response.status, detail);
}

function askForKey(detail) {
  $("key-panel").hidden = false;
  $("key-message").textContent = sessionStorage.getItem(KEY_STORE) ? `The key was refused: ${detail}`
    : "This server needs an API key. It is kept in this browser tab only.";
}

// -- models and the form ------------------------------------------------------------------------------------------
async function loadModels() {
  try {
    const answer = await (await request("v1/models")).json();
    models = answer.models;
    $("model").replaceChildren(...models.map((m) => new Option(m.name, m.name, m.is_default, m.is_default)));
    showTasks();
    $("form-error").hidden = true;
  } catch (error) {
    if (error.status !== 401) showError($("form-error"), `Could not load the models: ${error.message}`);
  }
}

function showTasks() {
  const model = models.find((m) => m.name === $("model").value);
  const tasks = model ? model.supported_task_types : ["text2music"];
  const current = $("task_type").value;
  $("task_type").replaceChildren(...tasks.map((t) => new Option(t, t, false, t === current)));
  $("source-row").hidden = !SOURCE_TASKS.has($("task_type").value);
}

function formBody() {
  const form = $("job-form");
  const body = new FormData();
  for (const name of ["model", "task_type", "caption", "lyrics", "audio_duration", "inference_steps", "batch_size",
                      "audio_format"]) {
    const value = form.elements[name].value.trim();
    if (value !== "") body.append(name, value);  // absent: the server's default
  }
  const seed = form.elements.seed.value.trim();
  if (seed !== "") {
    body.append("seed", seed);
    body.append("use_random_seed", "false");
  }
  for (const name of ["reference_audio", "src_audio"]) {
    const input = form.elements[name];
    if (!input.closest("label").hidden && input.files.length) body.append(name, input.files[0]);
  }
  return body;
}

async function submitJob(event) {
  event.preventDefault();
  const button = $("submit");
  button.disabled = true;
  $("form-error").hidden = true;
  try {
    const job = await (await request("v1/music/generate", {method: "POST", body: formBody()})).json();
    remember({id: job.job_id, caption: $("caption").value.trim(), status: job.status, at: Date.now()});
    showJob(job.job_id);
  } catch (error) {
    showError($("form-error"), error.message);
  } finally {
    button.disabled = false;
  }
}

function showError(element, message) {
  element.textContent = message;
  element.hidden = false;
}

// -- this session's jobs (sessionStorage) -------------------------------------------------------------------------
function sessionJobs() {
  try { return JSON.parse(sessionStorage.getItem(JOBS_STORE)) || []; } catch (_) { return []; }
}

function remember(job) {
  const jobs = sessionJobs().filter((j) => j.id !== job.id);
  jobs.unshift(job);
  sessionStorage.setItem(JOBS_STORE, JSON.stringify(jobs.slice(0, 50)));
  listJobs();
}

function setStatus(id, status) {
  const jobs = sessionJobs();
  const job = jobs.find((j) => j.id === id);
  if (job && job.status !== status) {
    job.status = status;
    sessionStorage.setItem(JOBS_STORE, JSON.stringify(jobs));
    listJobs();
  }
}

function listJobs() {
  const jobs = sessionJobs();
  $("no-jobs").hidden = jobs.length > 0;
  $("jobs").replaceChildren(...jobs.map((job) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "job-link";
    button.dataset.jobId = job.id;
    button.innerHTML = `<span class="badge"></span> <code></code> <span class="muted"></span>`;
    button.children[0].textContent = job.status;
    button.children[0].dataset.status = job.status;
    button.children[1].textContent = job.id.slice(0, 8);
    button.children[2].textContent = job.caption || "(no caption)";
    button.addEventListener("click", () => showJob(job.id));
    const item = document.createElement("li");
    item.append(button);
    return item;
  }));
}

// -- one job: its view, its event stream ---------------------------------------------------------------------------
function showJob(id) {
  if (shown) {
    shown.abort.abort();
    shown.urls.forEach((url) => URL.revokeObjectURL(url));
  }
  shown = {id, abort: new AbortController(), urls: [], drawn: false};
  $("job-panel").hidden = false;
  $("job-id").textContent = id;
  $("job-status").textContent = "…";
  $("job-status").dataset.status = "";
  $("job-stage").textContent = "";
  $("job-progress").value = 0;
  $("job-error").hidden = true;
  $("cancel").hidden = true;
  $("outputs").replaceChildren();
  follow(shown);
}

// The job's view as it changes: `GET v1/jobs/{id}/events` read with fetch() (EventSource cannot send the key),
// reconnecting with Last-Event-ID when the stream breaks off before its `end` event.
async function follow(job) {
  let lastId = null;
  let failures = 0;
  while (!job.abort.signal.aborted) {
    try {
      const headers = lastId ? {"Last-Event-ID": lastId} : {};
      const response = await request(`v1/jobs/${encodeURIComponent(job.id)}/events`,
                                      {headers, signal: job.abort.signal});
      for await (const event of serverEvents(response.body)) {
        if (event.id !== null) lastId = event.id;
        failures = 0;
        render(job, JSON.parse(event.data));
        if (event.event === "end") return;
      }
    } catch (error) {
      if (job.abort.signal.aborted) return;
      if (error instanceof HttpError && error.status < 500) {  // 404: the server forgot the job; 401: no key
        $("job-stage").textContent = error.message;
        if (error.status === 404) setStatus(job.id, "gone");
        return;
      }
    }
    failures += 1;  // the stream broke off (network, restart, 503): try again, backing off up to 10 s
    await sleep(Math.min(10000, 250 * 2 ** failures), job.abort.signal);
  }
}

// Server-Sent Events from a byte stream: {event, data, id} per blank-line-terminated block (the WHATWG format:
// "field: value" lines, ":" comments, multi-line data joined with "\n").
async function* serverEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = {event: "message", data: [], id: null};
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();  // an unfinished line waits for the next chunk
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) yield {event: event.event, data: event.data.join("\n"), id: event.id};
        event = {event: "message", data: [], id: event.id};
        continue;
      }
      if (line.startsWith(":")) continue;  // keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "data") event.data.push(text);
      else if (field === "event") event.event = text;
      else if (field === "id") event.id = text;
    }
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, {once: true});
  });
}

function render(job, view) {
  if (job !== shown) return;
  const progress = view.progress || {stage: view.status, step: 0, total: 0};
  $("job-status").textContent = view.status;
  $("job-status").dataset.status = view.status;
  $("job-progress").value = view.status === "succeeded" ? 1 : fraction(progress);
  $("job-stage").textContent = describe(view, progress);
  $("job-stage").dataset.stage = progress.stage;
  $("cancel").hidden = TERMINAL.has(view.status);
  setStatus(job.id, view.status);
  if (view.error) showError($("job-error"), view.error);
  if (view.status === "succeeded" && !job.drawn) {
    job.drawn = true;
    showOutputs(job, view.result);
  }
}

function fraction({stage, step, total}) {
  const start = STAGE_PROGRESS[stage] ?? 0;
  if (stage === "diffusion" && total > 0) return start + (STAGE_PROGRESS.decode - start) * (step / total);
  return start;
}

function describe(view, {stage, step, total}) {
  if (view.status === "queued") {
    const eta = view.eta_seconds == null ? "" : `, starts in about ${Math.ceil(view.eta_seconds)} s`;
    return `position ${view.queue_position + 1} in line${eta}`;
  }
  if (view.status === "succeeded" && view.started_at && view.finished_at) {
    return `took ${(view.finished_at - view.started_at).toFixed(1)} s`;
  }
  if (view.status !== "running") return "";
  if (stage === "diffusion" && total) return `diffusion, step ${step} of ${total}`;
  if (stage === "lm" && total) return `language model, ${step} of ${total} codes`;
  return stage.replace("_", " ");
}

async function cancelJob() {
  const job = shown;
  try {
    render(job, await (await request(`v1/jobs/${encodeURIComponent(job.id)}/cancel`, {method: "POST"})).json());
  } catch (error) {
    showError($("job-error"), error.message);
  }
}

// -- outputs: a player, a waveform, a spectrogram and a download link each ----------------------------------------
function showOutputs(job, result) {
  const paths = (result && result.audio_paths) || [];
  $("outputs").replaceChildren(...paths.map((path, index) => {
    const figure = $("output-template").content.firstElementChild.cloneNode(true);
    figure.querySelector("figcaption").textContent = `Output ${index + 1}`;
    loadOutput(job, figure, path.replace(/^\//, ""), index);  // "/v1/audio?path=..." relative to the page
    return figure;
  }));
}

// The bytes are fetched once (with the key, which <audio src> could not send) and serve the player, the download
// and the pictures, through an object URL.
async function loadOutput(job, figure, url, index) {
  const caption = figure.querySelector("figcaption");
  try {
    const bytes = await (await request(url, {signal: job.abort.signal})).blob();
    const objectUrl = URL.createObjectURL(bytes);
    job.urls.push(objectUrl);
    const extension = new URLSearchParams(url.split("?")[1]).get("path").split(".").pop();
    figure.querySelector("audio").src = objectUrl;
    const link = figure.querySelector("a.download");
    link.href = objectUrl;
    link.download = `acestep-${job.id.slice(0, 8)}-${index + 1}.${extension}`;
    link.dataset.src = url;
    const audio = await decode(await bytes.arrayBuffer());
    caption.textContent = `Output ${index + 1}: ${audio.duration.toFixed(1)} s, ${audio.sampleRate} Hz`;
    drawWaveform(figure.querySelector("canvas.waveform"), audio);
    drawSpectrogram(figure.querySelector("canvas.spectrogram"), audio);
    figure.dataset.drawn = "true";
  } catch (error) {
    if (!job.abort.signal.aborted) caption.textContent = `Output ${index + 1}: ${error.message}`;
  }
}

function decode(buffer) {
  // An OfflineAudioContext decodes without an audio device or a user gesture (its rate: the decoded rate).
  return new OfflineAudioContext(1, 1, 48000).decodeAudioData(buffer);
}

// Mono: the channels' mean.
function monoSamples(audio) {
  const out = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const data = audio.getChannelData(c);
    for (let i = 0; i < data.length; i++) out[i] += data[i] / audio.numberOfChannels;
  }
  return out;
}

// A canvas sized to its CSS box in device pixels, so lines stay sharp on a phone.
function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(canvas.clientWidth * ratio));
  canvas.height = Math.max(1, Math.round(canvas.clientHeight * ratio));
  return canvas.getContext("2d");
}

// Each pixel column spans the min..max of its samples, scaled so that the loudest sample reaches the edge.
function drawWaveform(canvas, audio) {
  const context = fitCanvas(canvas);
  const {width, height} = canvas;
  const samples = monoSamples(audio);
  const perColumn = samples.length / width;
  const peak = samples.reduce((most, v) => Math.max(most, Math.abs(v)), 1e-4);
  context.fillStyle = getComputedStyle(canvas).color;
  for (let x = 0; x < width; x++) {
    let low = 1, high = -1;
    const end = Math.min(samples.length, Math.ceil((x + 1) * perColumn));
    for (let i = Math.floor(x * perColumn); i < end; i++) {
      low = Math.min(low, samples[i]);
      high = Math.max(high, samples[i]);
    }
    if (low > high) continue;
    const top = (1 - high / peak) * height / 2;
    const bottom = (1 - low / peak) * height / 2;
    context.fillRect(x, top, 1, Math.max(1, bottom - top));
  }
}

// Short-time FFT magnitudes in dB, one canvas column per frame, low frequencies at the bottom.
function drawSpectrogram(canvas, audio, size = 1024) {
  const context = fitCanvas(canvas);
  const {width, height} = canvas;
  const samples = monoSamples(audio);
  const hann = Float32Array.from({length: size}, (_, i) => 0.5 - 0.5 * Math.cos(2 * Math.PI * i / (size - 1)));
  const twiddles = fftTwiddles(size);
  const bins = size / 2;
  const frames = new Array(width);
  const re = new Float32Array(size), im = new Float32Array(size);
  let loudest = -Infinity;
  for (let x = 0; x < width; x++) {
    const start = Math.floor(x * Math.max(0, samples.length - size) / Math.max(1, width - 1));
    for (let i = 0; i < size; i++) {
      re[i] = (samples[start + i] || 0) * hann[i];
      im[i] = 0;
    }
    fft(re, im, twiddles);
    const db = new Float32Array(bins);
    for (let k = 0; k < bins; k++) {
      db[k] = 10 * Math.log10(re[k] * re[k] + im[k] * im[k] + 1e-12);
      loudest = Math.max(loudest, db[k]);
    }
    frames[x] = db;
  }
  const image = context.createImageData(width, height);
  const range = 80;  // dB shown below the loudest bin
  for (let x = 0; x < width; x++) {
    for (let y = 0; y < height; y++) {
      const bin = Math.min(bins - 1, Math.floor((height - 1 - y) * bins / height));
      const level = Math.max(0, Math.min(1, 1 + (frames[x][bin] - loudest) / range));
      const [r, g, b] = colour(level);
      const offset = 4 * (y * width + x);
      image.data[offset] = r;
      image.data[offset + 1] = g;
      image.data[offset + 2] = b;
      image.data[offset + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
}

// Dark blue -> purple -> orange -> pale yellow, as 0..1 rises.
function colour(level) {
  const stops = [[8, 8, 40], [90, 20, 120], [220, 70, 60], [250, 180, 40], [255, 250, 200]];
  const at = level * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(at));
  const t = at - i;
  return stops[i].map((v, c) => Math.round(v + (stops[i + 1][c] - v) * t));
}

// cos and sin of -2*pi*k/n for k < n/2: every butterfly's factor, computed once per size.
function fftTwiddles(n) {
  const cos = new Float32Array(n / 2), sin = new Float32Array(n / 2);
  for (let k = 0; k < n / 2; k++) {
    cos[k] = Math.cos(-2 * Math.PI * k / n);
    sin[k] = Math.sin(-2 * Math.PI * k / n);
  }
  return {cos, sin};
}

// In-place iterative radix-2 FFT (length a power of two): bit-reversal permutation, then butterflies.
function fft(re, im, {cos, sin}) {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) {
      [re[i], re[j]] = [re[j], re[i]];
      [im[i], im[j]] = [im[j], im[i]];
    }
  }
  for (let length = 2; length <= n; length <<= 1) {
    const stride = n / length;  // this stage's factor for k is twiddle k * stride
    for (let i = 0; i < n; i += length) {
      for (let k = 0; k < length / 2; k++) {
        const wr = cos[k * stride], wi = sin[k * stride];
        const a = i + k, b = a + length / 2;
        const tr = re[b] * wr - im[b] * wi, ti = re[b] * wi + im[b] * wr;
        re[b] = re[a] - tr;
        im[b] = im[a] - ti;
        re[a] += tr;
        im[a] += ti;
      }
    }
  }
}

// -- start --------------------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("job-form").addEventListener("submit", submitJob);
  $("model").addEventListener("change", showTasks);
  $("task_type").addEventListener("change", showTasks);
  $("cancel").addEventListener("click", cancelJob);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("key-panel").hidden = true;
    loadModels();
  });
  if (sessionStorage.getItem(KEY_STORE)) $("api-key").value = sessionStorage.getItem(KEY_STORE);
  listJobs();
  loadModels();
});
