// A small SVG line chart: one series over a time window, with min/max labels and the latest value.
// Drawn from data with DOM calls only; no library.

import { formatClock, formatNumber, h } from "./dom.js";

// Sized near how wide a chart shows (three to a row on a laptop, one on a phone), so the
// labels keep a readable size when the SVG scales.
const WIDTH = 340;
const HEIGHT = 150;
const PAD = { left: 44, right: 8, top: 10, bottom: 22 };

// points: [{t: ms, v: number}], sorted by t. from/to: the window in ms.
export function lineChart({ title, unit, points, from, to }) {
  const values = points.map((p) => p.v);
  const latest = points.length ? points[points.length - 1].v : null;
  const figure = h(
    "figure",
    { class: "chart" },
    h(
      "figcaption",
      {},
      h("span", { class: "chart-title" }, title),
      h("span", { class: "chart-value" }, latest === null ? "no data" : formatNumber(latest, unit)),
    ),
  );
  if (!points.length) {
    figure.append(
      h(
        "p",
        { class: "muted chart-empty" },
        "No heartbeats in this window. Choose a longer window, or check that the device is online.",
      ),
    );
    return figure;
  }
  let min = Math.min(...values);
  let max = Math.max(...values);
  if (min === max) {
    // A flat line sits in the middle instead of on an edge.
    min -= 1;
    max += 1;
  }
  if (min > 0 && min < max / 3) min = 0;
  const innerW = WIDTH - PAD.left - PAD.right;
  const innerH = HEIGHT - PAD.top - PAD.bottom;
  const x = (t) => PAD.left + ((t - from) / Math.max(1, to - from)) * innerW;
  const y = (v) => PAD.top + (1 - (v - min) / (max - min)) * innerH;
  const path = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join("");
  const svg = h(
    "svg:svg",
    {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-label": `${title}: ${points.length} samples from ${formatNumber(Math.min(...values), unit)} to ${formatNumber(Math.max(...values), unit)}, latest ${formatNumber(latest, unit)}`,
    },
    h("svg:line", {
      class: "axis",
      x1: PAD.left,
      x2: WIDTH - PAD.right,
      y1: HEIGHT - PAD.bottom,
      y2: HEIGHT - PAD.bottom,
    }),
    h("svg:line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: PAD.top, y2: PAD.top }),
    h("svg:text", { class: "tick", x: PAD.left - 6, y: PAD.top + 4, "text-anchor": "end" }, formatNumber(max)),
    h("svg:text", { class: "tick", x: PAD.left - 6, y: HEIGHT - PAD.bottom, "text-anchor": "end" }, formatNumber(min)),
    h("svg:text", { class: "tick", x: PAD.left, y: HEIGHT - 6 }, formatClock(from)),
    h("svg:text", { class: "tick", x: WIDTH - PAD.right, y: HEIGHT - 6, "text-anchor": "end" }, formatClock(to)),
    h("svg:path", { class: "line", d: path }),
  );
  if (points.length === 1) {
    svg.append(h("svg:circle", { class: "dot", cx: x(points[0].t), cy: y(points[0].v), r: 3 }));
  }
  figure.append(svg);
  return figure;
}
