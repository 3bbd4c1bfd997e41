// The upload page: pick or drop images. When a detector is served every image goes to /v1/detect,
// whatever its size (a street scene, a close-up, a crop): every sign boxed and named, and a photo of
// one sign also shows that sign's top 5. Without a detector images go to /v1/predict (top 5 each).
// An image that most likely shows none of the signs says so plainly.
"use strict";

const MAX_FILES_PER_REQUEST = 64;  // the service's default limit; larger selections go in several requests
const TOP_K = 5;
let detectorName = null;
let boxNamers = new Set();  // the models /v1/detect can name boxes with (an ensemble cannot)

const $ = (selector) => document.querySelector(selector);
const modelSelect = $("#model");
const statusLine = $("#status");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${d.loc.join(".")}: ${d.msg}`).join("; ");
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function percent(p) { return `${(100 * p).toFixed(p >= 0.995 || p < 0.001 ? 1 : 2)}%`; }

async function loadModels() {
  const response = await fetch("/v1/models");
  if (!response.ok) {
    setStatus(`Models unavailable: ${await errorText(response)}`, true);
    return;
  }
  const { models, default: best } = await response.json();
  const detector = models.find((m) => m.kind === "detector");
  detectorName = detector ? detector.name : null;
  boxNamers = new Set(models.filter((m) => m.kind === "classifier").map((m) => m.name));
  modelSelect.replaceChildren(...models.filter((m) => m.kind !== "detector").map((m) => el("option", {
    value: m.name, text: `${m.name} (${m.members ? m.members.join(" + ") : m.architecture}, ` +
      `${(100 * (m.test_accuracy ?? 0)).toFixed(2)}% test)`,
  })));
  if (best) modelSelect.value = best;
  modelSelect.disabled = false;
  showModelInfo(models);
  modelSelect.addEventListener("change", () => showModelInfo(models));
  $("#plots").replaceChildren(...models.filter((m) => m.epochs > 0).map((m) => el("figure", {},
    el("img", { src: `/v1/models/${encodeURIComponent(m.name)}/metrics.png`, alt: `training curves of ${m.name}`,
                loading: "lazy" }),
    el("figcaption", {}, `${m.name}: `,
      el("a", { href: `/v1/models/${encodeURIComponent(m.name)}/metrics.png`, text: "plot" }), " · ",
      el("a", { href: `/v1/models/${encodeURIComponent(m.name)}/metrics.csv`, text: "CSV" }), " · ",
      el("a", { href: `/v1/models/${encodeURIComponent(m.name)}/metrics`, text: "JSON" })))));
}

function showModelInfo(models) {
  const m = models.find((x) => x.name === modelSelect.value);
  if (!m) return;
  const trained = m.members ? `the mean of the calibrated probabilities of ${m.members.join(" and ")}`
    : `${m.input_size}×${m.input_size} input, ${m.epochs} epochs from ${m.start_weights} weights`;
  $("#model-info").textContent = `${m.parameters.toLocaleString("en")} parameters, ${trained}, on ${m.device}` +
    (detectorName ? `; photos: signs found by ${detectorName}, named by this model` : "");
}

function sceneCard(file, result) {
  const stage = el("div", { class: "stage" }, el("img", { alt: file.name, src: URL.createObjectURL(file) }));
  const pct = (v, total) => `${(100 * v / total).toFixed(3)}%`;
  result.signs.forEach((s, i) => {
    const [x1, y1, x2, y2] = s.box;
    stage.append(el("div", {
      class: `box ${s.group}`, title: `${s.label} (${percent(s.probability)})`,
      style: `left: ${pct(x1, result.width)}; top: ${pct(y1, result.height)}; ` +
             `width: ${pct(x2 - x1, result.width)}; height: ${pct(y2 - y1, result.height)}`,
    }, el("span", { class: "tag", text: String(i + 1) })));
  });
  const only = result.signs.length === 1 ? result.signs[0] : null;
  const list = result.signs.length
    ? el("ol", { class: "signs" }, ...result.signs.map((s) => el("li", { class: "sign", "data-class-id": String(s.class_id) },
        el("span", { class: "label", text: s.label }), " ",
        el("span", { class: "probability", text: percent(s.probability) }),
        el("span", { class: "muted", text: ` · ${s.group}, detector ${percent(s.score)}` }))))
    : el("p", { class: "no-signs", text: "No traffic sign found in this photo." });
  // one sign: its top 5, as for a crop
  const top = only ? [el("ol", { class: "predictions" }, ...predictionRows(only.top))] : [];
  return el("article", { class: "result scene" }, stage,
    el("div", { class: "body" }, el("div", { class: "filename", text: result.filename || file.name }),
      el("div", { class: "muted", text: `${result.width}×${result.height}, ${result.signs.length} sign` +
                                          `${result.signs.length === 1 ? "" : "s"}` }), list, ...top));
}

async function post(url, chunk) {
  const form = new FormData();
  for (const file of chunk) form.append("file", file, file.name);
  let response;
  try {
    response = await fetch(url, { method: "POST", body: form });
  } catch (err) {
    throw new Error(`Request failed: ${err}`);
  }
  if (!response.ok) throw new Error(`Could not ${url.includes("detect") ? "detect" : "classify"}: ${await errorText(response)}`);
  return response.json();
}

function predictionRows(predictions) {
  return predictions.map((p) => el("li", { class: "prediction", "data-class-id": String(p.class_id) },
    el("div", { class: "row" }, el("span", { class: "label", text: p.label }),
      el("span", { class: "probability", text: percent(p.probability) })),
    el("div", { class: "bar" }, el("span", { style: `width: ${(100 * p.probability).toFixed(1)}%` }))));
}

function resultCard(file, result) {
  const thumb = el("div", { class: "thumb" });
  const img = el("img", { alt: file.name, src: URL.createObjectURL(file) });
  img.addEventListener("error", () => thumb.replaceChildren("no preview"));  // e.g. PPM: browsers cannot show it
  thumb.append(img);
  const rows = predictionRows(result.predictions);
  const verdict = result.recognized ? []
    : [el("p", { class: "verdict", text: "No sign recognised" }),
       el("p", { class: "muted", text: "The image most likely shows none of the 43 signs; the closest classes:" })];
  return el("article", { class: result.recognized ? "result" : "result unrecognized" }, thumb,
    el("div", { class: "body" }, el("div", { class: "filename", text: result.filename || file.name }),
      ...verdict, el("ol", { class: "predictions" }, ...rows)));
}

async function classify(files) {
  files = [...files];
  if (!files.length) return;
  const model = modelSelect.value;
  const results = $("#results");
  results.replaceChildren();
  setStatus(`Recognising ${files.length} image${files.length > 1 ? "s" : ""} with ${model}…`);
  const cards = new Array(files.length);
  let namedBy = model;
  const all = files.map((f, i) => i);
  const crops = detectorName ? [] : all;
  const photos = detectorName ? all : [];
  try {
    for (let start = 0; start < crops.length; start += MAX_FILES_PER_REQUEST) {
      const idx = crops.slice(start, start + MAX_FILES_PER_REQUEST);
      const body = await post(`/v1/predict?model=${encodeURIComponent(model)}&top_k=${TOP_K}`, idx.map((i) => files[i]));
      body.results.forEach((result, k) => { cards[idx[k]] = resultCard(files[idx[k]], result); });
    }
    for (let start = 0; start < photos.length; start += MAX_FILES_PER_REQUEST) {
      const idx = photos.slice(start, start + MAX_FILES_PER_REQUEST);
      // the selected model names the boxes when it can; otherwise the service's default namer does
      const query = boxNamers.has(model) ? `?classifier=${encodeURIComponent(model)}` : "";
      const body = await post(`/v1/detect${query}`, idx.map((i) => files[i]));
      namedBy = body.classifier;
      body.results.forEach((result, k) => { cards[idx[k]] = sceneCard(files[idx[k]], result); });
    }
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  results.append(...cards);
  const images = `${files.length} image${files.length > 1 ? "s" : ""}`;
  setStatus(photos.length ? `${images} searched for signs by ${detectorName}, named by ${namedBy}.`
                          : `${images} classified by ${model}.`);
}

function setUpDropzone() {
  const zone = $("#dropzone");
  const input = $("#files");
  input.addEventListener("change", () => classify(input.files));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (e) => { e.preventDefault(); classify(e.dataTransfer.files); });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
}

setUpDropzone();
loadModels().catch((err) => setStatus(`Could not load the models: ${err}`, true));
