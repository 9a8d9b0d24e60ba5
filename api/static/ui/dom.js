// Small DOM and formatting helpers shared by the views.

/** An element: h("td", {class: "num"}, "0.5", child). Attributes starting with "on" are listeners. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

export function pct(x, digits = 1) {
  return typeof x === "number" && Number.isFinite(x) ? `${(100 * x).toFixed(digits)}%` : "–";
}

export function num(x, digits = 4) {
  return typeof x === "number" && Number.isFinite(x) ? Number(x.toPrecision(digits)).toString() : "–";
}

export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** Wilson score interval (95%) of a proportion p observed on n trials: [low, high]. */
export function wilson(p, n, z = 1.959964) {
  if (!(n > 0) || typeof p !== "number") return null;
  const z2 = z * z;
  const centre = (p + z2 / (2 * n)) / (1 + z2 / n);
  const half = (z / (1 + z2 / n)) * Math.sqrt((p * (1 - p)) / n + z2 / (4 * n * n));
  return [Math.max(0, centre - half), Math.min(1, centre + half)];
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-status": status }, status);
}

/** A job's students and methods, whether it trains one student or several. */
export function studentsOf(job) {
  const several = job.params && Array.isArray(job.params.students) ? job.params.students : null;
  if (several && several.length) {
    return several.map((s) => ({ name: s.name || `${s.student}-${s.method}`, student: s.student, method: s.method }));
  }
  return [{ name: "", student: job.student, method: job.method }];
}

/** Progress as a <progress> bar plus a short text ("epoch 2/3", "evaluating best: fgsm"). */
export function progressCell(job) {
  const p = job.progress || {};
  const fraction = typeof p.fraction === "number" ? p.fraction : 0;
  const bar = h("progress", { max: "1", value: String(fraction) });
  let text;
  if (TERMINAL.has(job.status)) {
    text = job.status === "succeeded" ? "done" : job.status;
  } else if (p.phase === "evaluating" || job.status === "evaluating") {
    text = `evaluating ${p.checkpoint || ""} ${p.attack || ""}`.replace(/\s+/g, " ").trim();
  } else if (p.epochs) {
    text = `epoch ${p.epoch || 0}/${p.epochs}`;
  } else {
    text = pct(fraction, 0);
  }
  return h("div", { class: "progress" }, bar, h("span", { class: "small" }, text));
}
