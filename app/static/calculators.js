// The calculator section of the upload page, rendered into <div id="calculators">: receptive field
// (table + plot of R_l per layer), conv layer shape and cost, and a convolution written as its matrix.
// Plain JS, no build step. Wrapped in a function so its names never clash with the page's other scripts;
// the parsers are exported under Node so tests can run them without a browser.
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_SHOWN_CELLS = 20000;  // larger matrices are shown in part (the JSON answer has all of it)

  // --- parsing (no DOM) --------------------------------------------------------------------------

  // "5 1 0 1" / "5x1" / "3, 2" per line, k [s [p [d]]]; text after "#" is a comment.
  function parseLayers(text) {
    const layers = [];
    text.split("\n").forEach((raw, index) => {
      const line = raw.split("#")[0].trim();
      if (!line) return;
      const parts = line.split(/[\s,x]+/i).filter(Boolean);
      if (parts.length > 4 || !parts.every((p) => /^-?\d+$/.test(p))) {
        throw new Error(`line ${index + 1}: expected 1 to 4 integers "kernel stride padding dilation", got "${line}"`);
      }
      const [k, s = 1, p = 0, d = 1] = parts.map(Number);
      layers.push({ kernel_size: k, stride: s, padding: p, dilation: d });
    });
    if (!layers.length) throw new Error("enter at least one layer");
    return layers;
  }

  // "3", "3 5" or "3x5" -> 3 or [3, 5]
  function parseIntOrPair(text, what) {
    const parts = String(text).trim().split(/[\s,x]+/i).filter(Boolean);
    if (!parts.length || parts.length > 2 || !parts.every((p) => /^-?\d+$/.test(p))) {
      throw new Error(`${what}: expected one integer or two ("3" or "3 5"), got "${text}"`);
    }
    return parts.length === 1 ? Number(parts[0]) : parts.map(Number);
  }

  // "3 3", "3x3" or "2 3 3" -> [3, 3] / [2, 3, 3]
  function parseSize(text) {
    const parts = String(text).trim().split(/[\s,x]+/i).filter(Boolean);
    if (parts.length < 2 || parts.length > 3 || !parts.every((p) => /^\d+$/.test(p))) {
      throw new Error(`input size: expected "H W" or "C H W", got "${text}"`);
    }
    return parts.map(Number);
  }

  // JSON (2-D or 4-D), or rows on lines (or split by ";") with entries split by spaces or commas.
  // Tokens that read as numbers become numbers, the rest symbols.
  function parseKernel(text) {
    const trimmed = text.trim();
    if (trimmed.startsWith("[")) return JSON.parse(trimmed);
    const rows = trimmed.split(/[;\n]/).map((row) => row.split(/[\s,]+/).filter(Boolean)).filter((r) => r.length);
    if (!rows.length) throw new Error("enter a kernel, e.g. \"w1 w2\" and \"w3 w4\" on two lines");
    const number = /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i;
    return rows.map((row) => row.map((t) => (number.test(t) ? Number(t) : t)));
  }

  // FastAPI answers {"detail": "text"} or {"detail": [{"loc": [...], "msg": "..."}]}.
  function describeError(body, status) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && Array.isArray(body.detail)) {
      return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
    return `HTTP ${status}`;
  }

  if (typeof module !== "undefined" && module.exports) {
    module.exports = { parseLayers, parseIntOrPair, parseSize, parseKernel, describeError };
  }
  if (typeof document === "undefined") return;

  // --- DOM ---------------------------------------------------------------------------------------

  const root = document.getElementById("calculators");
  if (!root) return;

  if (!document.querySelector('link[href="/static/calculators.css"]')) {
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = "/static/calculators.css";
    document.head.append(link);
  }

  function h(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function field(label, input) {
    return h("label", { class: "calc-field" }, h("span", { text: label }), input);
  }

  async function call(method, path, body) {
    const response = await fetch(path, {
      method,
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    let data = null;
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) throw new Error(describeError(data, response.status));
    return data;
  }

  function showError(output, error) {
    output.replaceChildren(h("p", { class: "calc-error", role: "alert", text: error.message }));
  }

  // rowHeader: the first column labels the rows (a <th>, never styled by cellClass)
  function table(headers, rows, cellClass, rowHeader = false) {
    const head = h("tr", {}, ...headers.map((text) => h("th", { text })));
    const body = rows.map((row) => h("tr", {}, ...row.map((value, j) => {
      const text = value === null || value === undefined ? "" : String(value);
      if (rowHeader && j === 0) return h("th", { scope: "row", text });
      const cell = h("td", { text });
      const cls = cellClass ? cellClass(value) : "";
      if (cls) cell.className = cls;
      return cell;
    })));
    return h("table", { class: "calc-table" }, h("thead", {}, head), h("tbody", {}, ...body));
  }

  // R_l against l, with the input (l = 0, R = 1) as the first point.
  function plotReceptiveField(rows) {
    const width = 520, height = 270, left = 48, right = 16, top = 28, bottom = 40;
    const points = [{ layer: 0, rf: 1, label: "input" }].concat(
      rows.map((r) => ({ layer: r.layer, rf: r.receptive_field, label: r.name || `layer ${r.layer}` })));
    const maxX = Math.max(1, points.length - 1);
    const maxY = Math.max(...points.map((p) => p.rf));
    const x = (v) => left + (v / maxX) * (width - left - right);
    const y = (v) => top + (1 - v / maxY) * (height - top - bottom);
    const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "calc-plot", role: "img",
                              "aria-label": "receptive field per layer" });
    plot.append(svg("line", { x1: left, y1: y(0), x2: width - right, y2: y(0), class: "axis" }));
    plot.append(svg("line", { x1: left, y1: top, x2: left, y2: y(0), class: "axis" }));
    const yTicks = 4;
    for (let i = 0; i <= yTicks; i++) {
      const value = Math.round((maxY * i) / yTicks);
      plot.append(svg("line", { x1: left - 4, y1: y(value), x2: width - right, y2: y(value), class: "grid" }));
      plot.append(svg("text", { x: left - 8, y: y(value) + 4, "text-anchor": "end" }, String(value)));
    }
    const step = Math.ceil(points.length / 12);
    points.forEach((p, i) => {
      if (i % step === 0 || i === points.length - 1) {
        plot.append(svg("text", { x: x(p.layer), y: height - bottom + 16, "text-anchor": "middle" }, String(p.layer)));
      }
    });
    plot.append(svg("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle" }, "layer l"));
    plot.append(svg("text", { x: left, y: 12, "text-anchor": "middle" }, "R_l"));
    plot.append(svg("polyline", { points: points.map((p) => `${x(p.layer)},${y(p.rf)}`).join(" "), class: "line" }));
    for (const p of points) {
      const dot = svg("circle", { cx: x(p.layer), cy: y(p.rf), r: 3.5, class: "dot" });
      dot.append(svg("title", {}, `${p.label}: R = ${p.rf}`));
      plot.append(dot);
    }
    return plot;
  }

  function showReceptiveField(output, answer) {
    const rows = answer.layers;
    const hasNames = rows.some((r) => r.name);
    const headers = ["l"].concat(hasNames ? ["name"] : [], ["k", "s", "p", "d", "R_l", "R_l closed form", "jump",
                                                           "output size", "start"]);
    const cells = rows.map((r) => [r.layer].concat(hasNames ? [r.name] : [], [
      r.kernel_size, r.stride, r.padding, r.dilation, r.receptive_field, r.receptive_field_closed_form, r.jump,
      r.output_size, r.start]));
    const caption = answer.model
      ? h("p", { class: "muted",
                 text: `${answer.model} (${answer.architecture}) at ${answer.input_size}x${answer.input_size}` })
      : "";
    output.replaceChildren(caption, table(headers, cells), plotReceptiveField(rows));
  }

  // --- receptive field -----------------------------------------------------------------------------

  function receptiveFieldSection() {
    const layers = h("textarea", { rows: 6, cols: 24, spellcheck: "false", "aria-label": "layers" });
    layers.value = "5 1 0 1\n5 1 0 1\n5 1 0 1\n5 1 0 1";
    const size = h("input", { type: "number", min: 1, max: 16384, value: 32 });
    const compute = h("button", { type: "button", text: "Compute" });
    const model = h("select", { "aria-label": "served model" });
    const fromModel = h("button", { type: "button", text: "Use a served model", disabled: "" });
    const output = h("div", { class: "calc-output", "aria-live": "polite" });

    compute.addEventListener("click", async () => {
      try {
        showReceptiveField(output, await call("POST", "/v1/calculators/receptive-field",
          { input_size: Number(size.value), layers: parseLayers(layers.value) }));
      } catch (error) { showError(output, error); }
    });
    fromModel.addEventListener("click", async () => {
      try {
        const answer = await call("GET", `/v1/models/${encodeURIComponent(model.value)}/receptive-field`);
        layers.value = answer.layers
          .map((r) => `${r.kernel_size} ${r.stride} ${r.padding} ${r.dilation}  # ${r.name}`).join("\n");
        size.value = answer.input_size;
        showReceptiveField(output, answer);
      } catch (error) { showError(output, error); }
    });
    call("GET", "/v1/models").then((list) => {
      for (const m of (list && list.models) || []) model.append(h("option", { value: m.name, text: m.name }));
      if (model.options.length) fromModel.removeAttribute("disabled");
    }).catch(() => { /* no models served: the button stays disabled */ });

    return h("div", { class: "calc-card" },
      h("h3", { text: "Receptive field" }),
      h("p", { class: "muted", text: "One layer per line: kernel stride padding dilation (defaults 1 0 1). " +
                                     "Pooling layers are layers too." }),
      h("div", { class: "calc-inputs" }, field("Layers", layers), field("Input size", size),
        h("div", { class: "calc-buttons" }, compute, field("or read the layers off", model), fromModel)),
      output);
  }

  // --- conv layer --------------------------------------------------------------------------------

  function convLayerSection() {
    const inputs = {
      height: h("input", { type: "number", min: 1, value: 32 }),
      width: h("input", { type: "number", min: 1, value: 32 }),
      channels: h("input", { type: "number", min: 1, value: 3 }),
      filters: h("input", { type: "number", min: 1, value: 10 }),
      kernel: h("input", { type: "text", value: "5", size: 5 }),
      stride: h("input", { type: "text", value: "1", size: 5 }),
      padding: h("input", { type: "text", value: "0", size: 5 }),
      dilation: h("input", { type: "text", value: "1", size: 5 }),
    };
    const bias = h("input", { type: "checkbox", checked: "" });
    const compute = h("button", { type: "button", text: "Compute" });
    const output = h("div", { class: "calc-output", "aria-live": "polite" });

    compute.addEventListener("click", async () => {
      try {
        const answer = await call("POST", "/v1/calculators/conv-layer", {
          input_shape: { height: Number(inputs.height.value), width: Number(inputs.width.value),
                         channels: Number(inputs.channels.value) },
          filters: Number(inputs.filters.value),
          kernel_size: parseIntOrPair(inputs.kernel.value, "kernel"),
          stride: parseIntOrPair(inputs.stride.value, "stride"),
          padding: parseIntOrPair(inputs.padding.value, "padding"),
          dilation: parseIntOrPair(inputs.dilation.value, "dilation"),
          bias: bias.checked,
        });
        const s = answer.output_shape;
        output.replaceChildren(table(["output (H x W x C)", "parameters", "multiply-adds"],
          [[`${s.height} x ${s.width} x ${s.channels}`, answer.parameters.toLocaleString(),
            answer.multiply_adds.toLocaleString()]]));
      } catch (error) { showError(output, error); }
    });

    return h("div", { class: "calc-card" },
      h("h3", { text: "Conv layer: shape and cost" }),
      h("p", { class: "muted", text: "Kernel, stride, padding and dilation take one number or two (height width)." }),
      h("div", { class: "calc-inputs" },
        ...Object.entries(inputs).map(([name, input]) => field(name, input)), field("bias", bias), compute),
      output);
  }

  // --- conv as a matrix ----------------------------------------------------------------------------

  function convMatrixSection() {
    const kernel = h("textarea", { rows: 4, cols: 24, spellcheck: "false", "aria-label": "kernel" });
    kernel.value = "w1 w2\nw3 w4";
    const size = h("input", { type: "text", value: "3 3", size: 8 });
    const stride = h("input", { type: "text", value: "1", size: 4 });
    const padding = h("input", { type: "text", value: "0", size: 4 });
    const dilation = h("input", { type: "text", value: "1", size: 4 });
    const flip = h("input", { type: "checkbox" });
    const compute = h("button", { type: "button", text: "Compute" });
    const output = h("div", { class: "calc-output", "aria-live": "polite" });

    compute.addEventListener("click", async () => {
      try {
        const answer = await call("POST", "/v1/calculators/conv-matrix", {
          kernel: parseKernel(kernel.value), input_size: parseSize(size.value),
          stride: parseIntOrPair(stride.value, "stride"), padding: parseIntOrPair(padding.value, "padding"),
          dilation: parseIntOrPair(dilation.value, "dilation"), flip: flip.checked,
        });
        const [rows, cols] = answer.shape;
        const shownRows = Math.max(1, Math.min(rows, Math.floor(MAX_SHOWN_CELLS / cols)));
        const headers = [""].concat(Array.from({ length: cols }, (_, j) => String(j)));
        const cells = answer.matrix.slice(0, shownRows).map((row, i) => [i].concat(row));
        const parts = [
          h("p", { class: "muted", text: `${rows} x ${cols}: rows are output positions, columns input pixels ` +
                                         "(channel-major, then row-major)" +
                                         (shownRows < rows ? `; first ${shownRows} rows shown` : "") }),
          h("div", { class: "calc-scroll" },
            table(headers, cells, (v) => (v === 0 || v === "0" ? "zero" : ""), true)),
        ];
        if (answer.latex) {
          parts.push(h("details", {}, h("summary", { text: "LaTeX" }), h("pre", { text: answer.latex })));
        }
        output.replaceChildren(...parts);
      } catch (error) { showError(output, error); }
    });

    return h("div", { class: "calc-card" },
      h("h3", { text: "Convolution as a matrix" }),
      h("p", { class: "muted", text: "One kernel row per line; numbers, or names like w1 for a symbolic matrix " +
                                     "(or JSON [out][in][kh][kw] with a \"C H W\" size). Cross-correlation, as " +
                                     "conv2d computes; tick flip for true convolution." }),
      h("div", { class: "calc-inputs" }, field("Kernel", kernel), field("Input size (H W or C H W)", size),
        field("stride", stride), field("padding", padding), field("dilation", dilation), field("flip", flip),
        compute),
      output);
  }

  root.replaceChildren(h("h2", { text: "Calculators" }), receptiveFieldSection(), convLayerSection(),
                       convMatrixSection());
})();
