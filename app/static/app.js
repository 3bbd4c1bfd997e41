// The upload page: pick or drop images, POST them to /v1/predict, show the top-5 signs per image.
"use strict";

const MAX_FILES_PER_REQUEST = 64;  // the service's default limit; larger selections go in several requests
const TOP_K = 5;

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
  modelSelect.replaceChildren(...models.map((m) => el("option", {
    value: m.name, text: `${m.name} (${m.architecture}, ${(100 * (m.test_accuracy ?? 0)).toFixed(2)}% test)`,
  })));
  if (best) modelSelect.value = best;
  modelSelect.disabled = false;
  showModelInfo(models);
  modelSelect.addEventListener("change", () => showModelInfo(models));
  $("#plots").replaceChildren(...models.map((m) => el("figure", {},
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
  $("#model-info").textContent = `${m.parameters.toLocaleString("en")} parameters, ${m.input_size}×${m.input_size} ` +
    `input, ${m.epochs} epochs from ${m.start_weights} weights, on ${m.device}`;
}

function resultCard(file, result) {
  const thumb = el("div", { class: "thumb" });
  const img = el("img", { alt: file.name, src: URL.createObjectURL(file) });
  img.addEventListener("error", () => thumb.replaceChildren("no preview"));  // e.g. PPM: browsers cannot show it
  thumb.append(img);
  const rows = result.predictions.map((p) => el("li", { class: "prediction", "data-class-id": String(p.class_id) },
    el("div", { class: "row" }, el("span", { class: "label", text: p.label }),
      el("span", { class: "probability", text: percent(p.probability) })),
    el("div", { class: "bar" }, el("span", { style: `width: ${(100 * p.probability).toFixed(1)}%` }))));
  return el("article", { class: "result" }, thumb,
    el("div", { class: "body" }, el("div", { class: "filename", text: result.filename || file.name }),
      el("ol", { class: "predictions" }, ...rows)));
}

async function classify(files) {
  files = [...files];
  if (!files.length) return;
  const model = modelSelect.value;
  const results = $("#results");
  results.replaceChildren();
  setStatus(`Classifying ${files.length} image${files.length > 1 ? "s" : ""} with ${model}…`);
  for (let start = 0; start < files.length; start += MAX_FILES_PER_REQUEST) {
    const chunk = files.slice(start, start + MAX_FILES_PER_REQUEST);
    const form = new FormData();
    for (const file of chunk) form.append("file", file, file.name);
    let response;
    try {
      response = await fetch(`/v1/predict?model=${encodeURIComponent(model)}&top_k=${TOP_K}`,
                             { method: "POST", body: form });
    } catch (err) {
      setStatus(`Request failed: ${err}`, true);
      return;
    }
    if (!response.ok) {
      setStatus(`Could not classify: ${await errorText(response)}`, true);
      return;
    }
    const body = await response.json();
    body.results.forEach((result, i) => results.append(resultCard(chunk[i], result)));
  }
  setStatus(`${files.length} image${files.length > 1 ? "s" : ""} classified by ${model}.`);
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
