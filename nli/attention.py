"""What the model sees: every layer's and head's attention weights over one pair, as a figure or a web page.

The book draws attention as heat-maps (`d2l.show_heatmaps`); here the rows and columns are the pair's
own tokens, `<cls> premise <sep> hypothesis <sep>`, with the premise/hypothesis boundary marked.
"""
import dataclasses
import html
import json
import os
import re
import weakref

import mxnet as mx
import numpy as onp
from mxnet import gluon, np

from .errors import UserError
from .figures import pyplot
from .fileio import write_atomically
from .snli import LABELS

INPUTS = (("tokens", "int32"), ("segments", "int32"), ("valid_lens", "float32"))  # the classifier's
VIEWS = (".png", ".html")
HEADS = ("all", "mean")  # a figure of every head, or of the heads' mean in each layer
MEAN_COLUMNS = 3  # layers a row in the figure of the heads' means
_GRAPHS = weakref.WeakKeyDictionary()  # classifier -> its attention graph, built on the first request


@dataclasses.dataclass
class PairAttention:
    """One pair as the classifier saw it: its tokens, their segments, its prediction and attention weights."""
    premise: str
    hypothesis: str
    tokens: list  # `<cls>` premise `<sep>` hypothesis `<sep>`, as the vocabulary spells them
    segments: onp.ndarray  # (T,): 0 for `<cls>` premise `<sep>`, 1 for hypothesis `<sep>`
    weights: onp.ndarray  # (layers, heads, T, T): row i is where token i attends; each row sums to 1
    label: str
    probabilities: dict  # label -> probability

    @property
    def boundary(self):
        """Index of the first hypothesis token: segment 0 is `<cls>` premise `<sep>`."""
        return int((self.segments == 0).sum())


def attention_graph(net):
    """A graph giving `net`'s probabilities and attention weights (batch, layers, heads, T, T) in one pass.

    It is built the first time it is asked for, beside the classifier's own graph, which stays as it was
    (no extra outputs: prediction and training cost what they did). It is a `SymbolBlock` over the very
    same parameters, nothing copied, so it sees every update training makes.
    """
    if net not in _GRAPHS:
        inputs = [mx.sym.var(name, dtype=dtype).as_np_ndarray() for name, dtype in INPUTS]
        blocks = [blk.attention for blk in net.encoder.blks]
        weights = []
        for block in blocks:
            block.weights_sink = weights
        try:
            logits = net(*inputs)  # traced, not run: each attention block hands over its softmax weights
        finally:
            for block in blocks:
                block.weights_sink = None
        # (batch * heads, T, T) per layer -> (batch, layers, heads, T, T)
        per_layer = [mx.sym.npx.reshape(w, (-6, -1, blocks[0].num_heads, -2, -2)) for w in weights]
        outputs = [mx.sym.npx.softmax(logits, axis=-1), mx.sym.np.stack(per_layer, axis=1)]
        graph = gluon.SymbolBlock(outputs, inputs, params=net.collect_params())
        graph.hybridize(static_alloc=True)
        _GRAPHS[net] = graph
    return _GRAPHS[net]


def pair_attention(net, vocab, encoded, device, premise, hypothesis):
    """The `PairAttention` of the one pair in `encoded` (unpadded), its weights and label from one forward pass."""
    length = int(encoded.valid_lens[0])
    token_ids, segments, valid_lens = encoded.padded([0], length)
    probabilities, weights = attention_graph(net)(np.array(token_ids, dtype="int32", ctx=device),
                                                  np.array(segments, dtype="int32", ctx=device),
                                                  np.array(valid_lens, dtype="float32", ctx=device))
    probabilities = probabilities.asnumpy()[0]
    return PairAttention(premise, hypothesis, [vocab.idx_to_token[i] for i in token_ids[0]], segments[0],
                         weights.asnumpy()[0], LABELS[int(probabilities.argmax())],
                         dict(zip(LABELS, map(float, probabilities))))


def describe_prediction(pair):
    """'predicted entailment (entailment 0.91, contradiction 0.03, neutral 0.06)'."""
    return f"predicted {pair.label} (" + ", ".join(f"{k} {v:.2f}" for k, v in pair.probabilities.items()) + ")"


def attention_figure(pair, heads="all"):
    """A grid of heat-maps, layers down and heads across (or each layer's mean of the heads), tokens on the axes."""
    if heads not in HEADS:
        raise UserError(f"--heads {heads!r}: expected one of {', '.join(HEADS)}.")
    layers, num_heads, length, _ = pair.weights.shape
    if heads == "mean":
        maps = pair.weights.mean(axis=1)
        titles = [f"layer {layer + 1}, heads' mean" for layer in range(layers)]
        cols, cell, font = min(layers, MEAN_COLUMNS), max(2.0, 0.15 * length), 7  # inches a map, label points
    else:
        maps = pair.weights.reshape(-1, length, length)
        titles = [f"layer {layer + 1}, head {head + 1}" for layer in range(layers) for head in range(num_heads)]
        cols, cell, font = num_heads, max(1.4, 0.085 * length), 5
    rows = -(-len(maps) // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(cell * cols + 1.2, cell * rows + 1.4), squeeze=False,
                             layout="constrained")
    colors = ["tab:blue" if s == 0 else "tab:red" for s in pair.segments]  # premise blue, hypothesis red
    for index, ax in enumerate(axes.flat):
        if index >= len(maps):
            ax.axis("off")
            continue
        image = ax.imshow(maps[index], cmap="Reds", vmin=0, vmax=1)  # the colours of the book's show_heatmaps
        for line in (ax.axhline, ax.axvline):
            line(pair.boundary - 0.5, color="black", linewidth=0.8)
        ax.set_title(titles[index], fontsize=font + 1)
        labelled_y, labelled_x = index % cols == 0, index + cols >= len(maps)  # first column, lowest in its column
        ax.set_yticks(range(length), pair.tokens if labelled_y else [], fontsize=font)
        ax.set_xticks(range(length), pair.tokens if labelled_x else [], fontsize=font, rotation=90)
        for labels in (ax.get_yticklabels(), ax.get_xticklabels()):
            for label, color in zip(labels, colors):
                label.set_color(color)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.supylabel("query: the token attending", fontsize=9)
    fig.supxlabel("key: the token attended to (premise blue, hypothesis red; the line marks the boundary)",
                  fontsize=9)
    fig.suptitle(f"{describe_prediction(pair)}\npremise: {pair.premise}\nhypothesis: {pair.hypothesis}",
                 fontsize=10)
    return fig


def save_png(pair, path, heads="all"):
    """The `attention_figure` as a PNG."""
    fig = attention_figure(pair, heads)
    fig.savefig(path, format="png", dpi=100)
    pyplot().close(fig)


def view_data(pair):
    """The pair as JSON-ready data: what the page draws, and what `nli serve` answers (weights to 4 decimals)."""
    return {"premise": pair.premise, "hypothesis": pair.hypothesis, "tokens": pair.tokens,
            "segments": [int(s) for s in pair.segments], "label": pair.label,
            "probabilities": pair.probabilities, "boundary": pair.boundary,
            "weights": onp.round(pair.weights.astype(onp.float64), 4).tolist()}  # float64: short decimals


def page_html(data):
    """One self-contained page (no network) of a pair's `view_data`: pick a layer and head, hover a token to see
    where it attends."""
    values = {"TITLE": html.escape(f"{data['premise']} / {data['hypothesis']}"),
              "DATA": json.dumps(data, ensure_ascii=False).replace("</", "<\\/")}  # "</script>" in a sentence
    return re.sub(r"\$(TITLE|DATA)", lambda m: values[m.group(1)], PAGE)  # one pass: the text may hold "$DATA"


def save_html(pair, path):
    """The pair's `page_html`, written to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page_html(view_data(pair)))


def view_format(path):
    """'.png' or '.html', from the file name; anything else is refused before any work is done."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIEWS:
        raise UserError(f"--attention {path}: expected a .png (figure) or .html (interactive page) file name.")
    return ext


def save_view(pair, path, heads="all"):
    """Write the view `path` names, a .png figure or a .html page, never leaving half a file."""
    if view_format(path) == ".png":
        write_atomically(path, lambda tmp: save_png(pair, tmp, heads))
    else:
        write_atomically(path, lambda tmp: save_html(pair, tmp))


# The page: its data inlined as JSON, drawn on canvases by a few lines of plain JavaScript.
PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>attention: $TITLE</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px; }
.pair div { margin: 2px 0; } .premise { color: #1f77b4; } .hypothesis { color: #d62728; }
.probs { display: flex; gap: 16px; margin: 8px 0; }
.prob { width: 160px; } .bar { height: 10px; background: #ddd; } .bar div { height: 10px; background: #555; }
.prob.top .bar div { background: #d62728; } .prob.top { font-weight: bold; }
.controls { margin: 10px 0; } select { font-size: 14px; margin-right: 12px; }
.main { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
#tokens span { display: inline-block; padding: 2px 4px; margin: 2px 1px; border: 1px solid #ccc; border-radius: 3px;
  cursor: default; }
#tokens span.p { border-color: #1f77b4; } #tokens span.h { border-color: #d62728; }
#tokens span.query { outline: 2px solid #000; }
#tokens span.sep { border: none; border-left: 2px solid #000; border-radius: 0; padding: 0; margin: 0 4px 0 8px;
  height: 20px; vertical-align: middle; }
#overview { border-collapse: collapse; } #overview td, #overview th { padding: 1px; font-size: 11px; }
#overview canvas { border: 2px solid transparent; cursor: pointer; display: block; }
#overview canvas.picked { border-color: #000; }
#readout { min-height: 1.4em; font-family: monospace; } #scale { color: #666; font-size: 12px; margin-bottom: 6px; }
</style></head>
<body>
<h1>What the model sees</h1>
<div class="pair"><div class="premise"></div><div class="hypothesis"></div></div>
<div class="probs" id="probs"></div>
<div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span>Hover a token, or a row of the map, to see where it attends (rows: the token attending; columns: the
  token attended to; the black lines mark the premise/hypothesis boundary).</span>
</div>
<div id="tokens"></div>
<div id="readout"></div>
<div id="scale"></div>
<div class="main">
  <canvas id="map"></canvas>
  <div><div>every layer (rows) and head (columns); click one to pick it</div><table id="overview"></table></div>
</div>
<script id="attention-data" type="application/json">$DATA</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("attention-data").textContent);
const T = data.tokens.length, layers = data.weights.length, heads = data.weights[0].length;
const layerSelect = document.getElementById("layer"), headSelect = document.getElementById("head");
const map = document.getElementById("map"), readout = document.getElementById("readout");
let query = null;

document.querySelector(".premise").textContent = "premise: " + data.premise;
document.querySelector(".hypothesis").textContent = "hypothesis: " + data.hypothesis;
for (const [label, p] of Object.entries(data.probabilities)) {
  const div = document.createElement("div");
  div.className = "prob" + (label === data.label ? " top" : "");
  div.innerHTML = `<div>${label} ${p.toFixed(3)}</div>` +
    `<div class="bar"><div style="width:${(100 * p).toFixed(1)}%"></div></div>`;
  document.getElementById("probs").appendChild(div);
}
for (let l = 0; l < layers; l++) layerSelect.add(new Option(`${l + 1}`, l));
for (let h = 0; h < heads; h++) headSelect.add(new Option(`${h + 1}`, h));
headSelect.add(new Option("mean of the heads", "mean"));

function matrix(layer, head) {
  if (head !== "mean") return data.weights[layer][head];
  return data.weights[layer][0].map((row, i) => row.map((_, j) =>
    data.weights[layer].reduce((sum, h) => sum + h[i][j], 0) / heads));
}
function color(w) {  // white to dark red, as matplotlib's "Reds"
  const t = Math.max(0, Math.min(1, w));
  return `rgb(${Math.round(255 - 152 * t)},${Math.round(245 - 245 * t)},${Math.round(240 - 227 * t)})`;
}
function largest(m) { return Math.max(...m.map((row) => Math.max(...row))); }
function drawCells(ctx, m, x0, y0, cell) {  // colours scaled to the map's largest weight, as imshow does
  const top = largest(m);
  for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) {
    ctx.fillStyle = color(m[i][j] / top); ctx.fillRect(x0 + j * cell, y0 + i * cell, cell, cell);
  }
  ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.beginPath();
  ctx.moveTo(x0 + data.boundary * cell, y0); ctx.lineTo(x0 + data.boundary * cell, y0 + T * cell);
  ctx.moveTo(x0, y0 + data.boundary * cell); ctx.lineTo(x0 + T * cell, y0 + data.boundary * cell);
  ctx.stroke();
}
const cell = Math.max(8, Math.min(22, Math.floor(560 / T))), margin = 90;
function tokenColor(i) { return data.segments[i] === 0 ? "#1f77b4" : "#d62728"; }
function draw() {
  const m = matrix(+layerSelect.value, headSelect.value);
  map.width = map.height = margin + T * cell + 4;
  const ctx = map.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, map.width, map.height);
  drawCells(ctx, m, margin, margin, cell);
  ctx.font = `${Math.min(12, cell)}px sans-serif`; ctx.textBaseline = "middle";
  for (let i = 0; i < T; i++) {
    ctx.fillStyle = tokenColor(i); ctx.textAlign = "right";
    ctx.fillText(data.tokens[i], margin - 4, margin + (i + 0.5) * cell, margin - 6);
    ctx.save(); ctx.translate(margin + (i + 0.5) * cell, margin - 4); ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left"; ctx.fillText(data.tokens[i], 0, 0, margin - 6); ctx.restore();
  }
  if (query !== null) {
    ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
    ctx.strokeRect(margin, margin + query * cell, T * cell, cell);
  }
  document.getElementById("scale").textContent =
    `the darkest cell is a weight of ${largest(m).toFixed(3)}; each map is coloured from 0 to its own largest weight`;
  const head = headSelect.value === "mean" ? "mean" : +headSelect.value + 1;
  map.dataset.view = `layer ${+layerSelect.value + 1}, head ${head}`;
  for (const c of document.querySelectorAll("#overview canvas"))
    c.classList.toggle("picked", c.dataset.layer === layerSelect.value && c.dataset.head === headSelect.value);
  showQuery(m);
}
function showQuery(m) {
  const spans = document.querySelectorAll("#tokens span[data-i]");
  const top = query === null ? 1 : Math.max(...m[query]);
  spans.forEach((s, j) => {
    s.classList.toggle("query", j === query);
    s.style.background = query === null ? "" : color(m[query][j] / top);
    s.style.color = query !== null && m[query][j] / top > 0.6 ? "#fff" : "";
  });
  if (query === null) { readout.textContent = ""; return; }
  const strongest = m[query].map((w, j) => [w, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  readout.textContent = `${data.tokens[query]} attends to: ` +
    strongest.map(([w, j]) => `${data.tokens[j]} ${w.toFixed(3)}`).join(", ");
}
function setQuery(i) { query = i; draw(); }

const tokenRow = document.getElementById("tokens");
data.tokens.forEach((token, i) => {
  if (i === data.boundary) {
    const sep = document.createElement("span"); sep.className = "sep"; tokenRow.appendChild(sep);
  }
  const span = document.createElement("span");
  span.textContent = token; span.dataset.i = i; span.className = data.segments[i] === 0 ? "p" : "h";
  span.addEventListener("mouseenter", () => setQuery(i));
  tokenRow.appendChild(span);
});
tokenRow.addEventListener("mouseleave", () => setQuery(null));
map.addEventListener("mousemove", (e) => {
  const r = map.getBoundingClientRect(), i = Math.floor((e.clientY - r.top - margin) / cell);
  setQuery(i >= 0 && i < T ? i : null);
});
map.addEventListener("mouseleave", () => setQuery(null));

const overview = document.getElementById("overview"), small = Math.max(2, Math.floor(48 / T));
const header = overview.insertRow();
header.appendChild(document.createElement("th"));
for (let h = 0; h <= heads; h++) {
  const th = document.createElement("th");
  th.textContent = h < heads ? `head ${h + 1}` : "mean"; header.appendChild(th);
}
for (let l = 0; l < layers; l++) {
  const row = overview.insertRow(), th = document.createElement("th");
  th.textContent = `layer ${l + 1}`; row.appendChild(th);
  for (let h = 0; h <= heads; h++) {
    const c = document.createElement("canvas"), head = h < heads ? `${h}` : "mean";
    c.width = c.height = T * small; c.dataset.layer = `${l}`; c.dataset.head = head;
    drawCells(c.getContext("2d"), matrix(l, head), 0, 0, small);
    c.addEventListener("click", () => { layerSelect.value = `${l}`; headSelect.value = head; draw(); });
    row.insertCell().appendChild(c);
  }
}
layerSelect.addEventListener("change", draw);
headSelect.addEventListener("change", draw);
draw();
</script>
</body></html>
"""
