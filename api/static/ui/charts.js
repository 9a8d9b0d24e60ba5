// Per-epoch curves drawn with uPlot (served from this origin: vendor/uPlot.iife.min.js).
// Each chart keeps its number of epochs and points in data-epochs / data-points, for people and tests.

import { h } from "./dom.js";

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
// Keys of an epoch's metrics that are not terms of the training loss.
const NOT_LOSS = new Set([
  "epoch", "lr", "images", "warmup", "train_acc", "val_clean_acc", "val_robust_acc", "train_seconds",
  "seconds", "images_per_s", "best",
]);

/** {epoch: {student: metrics}} from the API's /metrics rows (one student: the name ""). */
export function metricsByEpoch(items) {
  const out = new Map();
  for (const row of items) add(out, row.epoch, row.metrics);
  return out;
}

/** Merge one epoch's row (a /metrics row or a "metrics" event's payload) into ``table``. */
export function add(table, epoch, metrics, student) {
  if (!metrics) return;
  const entry = table.get(epoch) || {};
  if (student) entry[student] = metrics;
  else if (metrics.students && typeof metrics.students === "object") Object.assign(entry, metrics.students);
  else entry[""] = metrics;
  table.set(epoch, entry);
}

function label(student, what) {
  return student ? `${student} ${what}` : what;
}

/** The three charts' series from the table: [{title, unit, series: [{label, values, dash}]}]. */
function seriesOf(table) {
  const epochs = [...table.keys()].sort((a, b) => a - b);
  const students = [...new Set(epochs.flatMap((e) => Object.keys(table.get(e))))].sort();
  const column = (student, key) => epochs.map((e) => {
    const v = (table.get(e)[student] || {})[key];
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  });
  const loss = [];
  const accuracy = [];
  const lr = [];
  students.forEach((student) => {
    const keys = new Set();
    for (const e of epochs) {
      for (const [k, v] of Object.entries(table.get(e)[student] || {})) {
        if (!NOT_LOSS.has(k) && typeof v === "number") keys.add(k);
      }
    }
    for (const k of [...keys].sort()) loss.push({ label: label(student, k), values: column(student, k) });
    accuracy.push({ label: label(student, "val clean"), values: column(student, "val_clean_acc"), student });
    accuracy.push({ label: label(student, "val robust"), values: column(student, "val_robust_acc"), student, dash: true });
    lr.push({ label: label(students.length > 1 ? student : "", "lr"), values: column(student, "lr"), student });
  });
  return { epochs, students, loss, accuracy: accuracy.filter((s) => s.values.some((v) => v !== null)), lr };
}

class Chart {
  constructor(parent, name, title, { percent = false } = {}) {
    this.percent = percent;
    this.box = h("div", { class: "chart-plot" });
    this.node = h("figure", { class: "chart", "data-chart": name, "data-epochs": "0", "data-points": "0" },
      h("figcaption", {}, title), this.box, h("p", { class: "muted small empty" }, "No epoch finished yet."));
    parent.append(this.node);
    this.plot = null;
    this.labels = "";
    new ResizeObserver(() => this.resize()).observe(this.box);
  }

  size() {
    const width = Math.max(240, this.box.clientWidth || 300);
    return { width, height: Math.round(Math.min(260, Math.max(180, width * 0.45))) };
  }

  resize() {
    if (this.plot) this.plot.setSize(this.size());
  }

  update(epochs, series, colourOf) {
    const points = series.reduce((n, s) => n + s.values.filter((v) => v !== null).length, 0);
    this.node.dataset.epochs = String(epochs.length);
    this.node.dataset.points = String(points);
    this.node.dataset.series = series.map((s) => s.label).join("|");
    this.node.classList.toggle("has-data", points > 0);
    const labels = series.map((s) => s.label).join("|");
    const data = [epochs, ...series.map((s) => s.values)];
    if (this.plot && labels === this.labels) {
      this.plot.setData(data);
      return;
    }
    if (this.plot) this.plot.destroy();
    this.labels = labels;
    this.plot = null;
    if (typeof window.uPlot !== "function") { // the server's npm step (scripts/setup.sh) has not run
      this.box.textContent = "The chart library is not installed on this server; the numbers are in the report.";
      return;
    }
    if (!series.length) return;
    const fmt = this.percent ? (v) => (v === null ? "–" : `${(100 * v).toFixed(1)}%`) : (v) => (v === null ? "–" : Number(v.toPrecision(4)).toString());
    const opts = {
      ...this.size(),
      scales: { x: { time: false } },
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      axes: [
        { label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500], values: (u, vals) => vals.map((v) => String(v)) },
        { values: (u, vals) => vals.map(fmt), size: 56 },
      ],
      series: [
        { label: "epoch", value: (u, v) => (v === null ? "–" : String(v)) },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: colourOf(s, i),
          width: 2,
          dash: s.dash ? [6, 4] : undefined,
          spanGaps: true,
          points: { show: true, size: 6 },
          value: (u, v) => fmt(v),
        })),
      ],
    };
    this.plot = new window.uPlot(opts, data, this.box);
  }
}

/** The job page's curves: training loss terms, validation clean/robust accuracy, learning rate. */
export class JobCharts {
  constructor(parent) {
    this.table = new Map();
    this.node = h("section", { class: "charts" });
    parent.append(this.node);
    this.loss = new Chart(this.node, "loss", "Training loss terms");
    this.accuracy = new Chart(this.node, "accuracy", "Validation accuracy (clean, robust)", { percent: true });
    this.lr = new Chart(this.node, "lr", "Learning rate");
  }

  load(items) {
    this.table = metricsByEpoch(items);
    this.draw();
  }

  addEpoch(epoch, metrics, student) {
    add(this.table, epoch, metrics, student);
    this.draw();
  }

  draw() {
    const { epochs, students, loss, accuracy, lr } = seriesOf(this.table);
    const byStudent = (s, i) => COLOURS[(s.student !== undefined ? students.indexOf(s.student) : i) % COLOURS.length];
    this.loss.update(epochs, loss, (s, i) => COLOURS[i % COLOURS.length]);
    this.accuracy.update(epochs, accuracy, students.length > 1 ? byStudent : (s) => (s.dash ? COLOURS[1] : COLOURS[0]));
    this.lr.update(epochs, lr, byStudent);
  }
}
