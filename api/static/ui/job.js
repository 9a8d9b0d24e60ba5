// One job: live status over the event stream, per-epoch curves, the evaluation table, warnings,
// artifact downloads and the cancel button.

import { download, get, getText, request } from "./api.js";
import { JobCharts } from "./charts.js";
import { bytes, clear, duration, h, num, pct, progressCell, statusBadge, studentsOf, TERMINAL, when, wilson } from "./dom.js";
import { follow } from "./sse.js";

export function showJob(view, jobId) {
  let stop = null;
  let gone = false;
  let finishedShown = false;
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const title = h("h1", {}, "Job ", h("code", {}, jobId));
  const status = h("span", { id: "job-status" });
  const cancel = h("button", { type: "button", id: "cancel-job", class: "danger", hidden: true }, "Cancel");
  const summary = h("dl", { class: "summary", id: "job-summary" });
  const message = h("p", { class: "error", id: "job-error", role: "alert" });
  const warnings = h("ul", { class: "warnings", id: "warnings" });
  const warningBox = h("section", { class: "card", hidden: true }, h("h2", {}, "Warnings"), warnings);
  const chartsBox = h("div");
  const evaluation = h("section", { class: "card", id: "evaluation" }, h("h2", {}, "Evaluation"),
    h("p", { class: "muted" }, "The report appears when the job has been evaluated."));
  const artifacts = h("section", { class: "card", id: "artifacts" }, h("h2", {}, "Files"),
    h("p", { class: "muted" }, "Files appear when the job has finished."));
  const seen = new Set();

  view.append(h("div", { class: "heading" }, title, status, cancel), message, summary, warningBox,
    h("section", { class: "card" }, h("h2", {}, "Training curves"), chartsBox), evaluation, artifacts);
  const charts = new JobCharts(chartsBox);

  function warn(text) {
    if (!text || seen.has(text)) return;
    seen.add(text);
    warnings.append(h("li", {}, text));
    warningBox.hidden = false;
  }

  function showSummary(job) {
    clear(status).append(statusBadge(job.status));
    cancel.hidden = TERMINAL.has(job.status) || job.cancel_requested;
    const students = studentsOf(job);
    const row = (term, ...value) => [h("dt", {}, term), h("dd", {}, ...value)];
    clear(summary).append(
      ...row("Student(s)", students.map((s) => (s.name ? `${s.name}: ${s.student} / ${s.method}` : `${s.student} / ${s.method}`)).join("; ")),
      ...row("Dataset", job.dataset || "–", job.dataset_id ? h("span", { class: "muted" }, ` (${job.dataset_id})`) : ""),
      ...row("Teacher", job.teacher_id || "none",
        typeof job.teacher_accuracy === "number" ? ` (clean accuracy ${pct(job.teacher_accuracy)})` : ""),
      ...row("Progress", h("span", { id: "job-progress" }, progressCell(job))),
      ...row("ETA", TERMINAL.has(job.status) ? "–" : duration(job.progress && job.progress.eta_s)),
      ...row("Created", when(job.created_at)),
      ...row("Finished", when(job.finished_at)),
      ...row("Attempts", String(job.attempts)),
    );
    message.textContent = job.error || (job.cancel_requested && !TERMINAL.has(job.status) ? "Cancellation requested." : "");
    for (const w of job.warnings || []) warn(w);
    if (job.degenerate_student) warn("The student is no better than guessing (kept because of allow_degenerate).");
  }

  let job = null;
  let latest = 0; // answers can arrive out of order: only the newest request's is shown
  async function refresh() {
    const mine = ++latest;
    const answer = await get(path);
    if (gone || mine !== latest) return;
    job = answer;
    showSummary(job);
    if (TERMINAL.has(job.status) && !finishedShown) {
      finishedShown = true;
      showReport();
      showArtifacts();
    }
  }

  async function showReport() {
    let report;
    try {
      report = await get(`${path}/report`);
    } catch (e) {
      clear(evaluation).append(h("h2", {}, "Evaluation"), e.status === 404
        ? h("p", { class: "muted" }, `No report: the job ended (${job.status}) before writing one.`)
        : h("p", { class: "error" }, e.message));
      return;
    }
    if (gone) return;
    clear(evaluation).append(h("h2", {}, "Evaluation"));
    const parts = report.students ? Object.entries(report.students) : [["", report]];
    for (const [name, part] of parts) {
      if (name) evaluation.append(h("h3", {}, name));
      evaluation.append(evaluationTable(part.final || {}, name));
      for (const w of part.warnings || []) warn(name && !w.startsWith(`${name}:`) ? `${name}: ${w}` : w);
    }
    if (report.comparisons && Array.isArray(report.comparisons.results) && report.comparisons.results.length) {
      evaluation.append(comparisonTable(report.comparisons));
    }
    for (const w of report.warnings || []) warn(w);
  }

  async function showArtifacts() {
    let list;
    try {
      list = await get(`${path}/artifacts`);
    } catch (e) {
      artifacts.append(h("p", { class: "error" }, e.message));
      return;
    }
    if (gone) return;
    const error = h("p", { class: "error", role: "alert" });
    const card = h("pre", { class: "model-card", id: "model-card", hidden: true });
    clear(artifacts).append(h("h2", {}, "Files"));
    for (const { name } of list.items.filter((a) => a.name.endsWith("model_card.md"))) {
      artifacts.append(h("p", {}, h("button", {
        type: "button", class: "link", "data-model-card": name,
        onclick: async () => {
          try {
            card.textContent = await getText(`${path}/artifacts/${encodeURIComponent(name)}`);
            card.dataset.shows = name;
            card.hidden = false;
          } catch (e) { error.textContent = e.message; }
        },
      }, name === "model_card.md" ? "Show the model card" : `Show the model card of ${name.replace(/\.model_card\.md$/, "")}`)));
    }
    const rows = list.items.map((a) => h("tr", {},
      h("td", { "data-label": "File" }, a.name),
      h("td", { "data-label": "Size", class: "num" }, bytes(a.size_bytes)),
      h("td", { "data-label": "" }, h("button", {
        type: "button", class: "link", "data-artifact": a.name,
        onclick: () => download(`${path}/artifacts/${encodeURIComponent(a.name)}`, a.name).catch((e) => { error.textContent = e.message; }),
      }, "Download"))));
    artifacts.append(error, h("div", { class: "table-wrap" }, h("table", { class: "files" },
      h("thead", {}, h("tr", {}, h("th", {}, "File"), h("th", {}, "Size"), h("th", {}, ""))), h("tbody", {}, rows))), card);
  }

  function onEvent({ type, data }) {
    if (gone) return;
    if (type === "progress" && job) {
      job.progress = data;
      showSummary(job);
    } else if (type === "metrics" && data.payload) {
      const p = data.payload;
      charts.addEpoch(Number(p.epoch), p.metrics, p.student);
    } else if (type === "warning" && data.payload) {
      warn(data.payload.message);
    } else if (type === "status" || type === "end" || type === "cancel_requested") {
      refresh().catch((e) => { message.textContent = e.message; });
    }
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      showSummary(await request("POST", `${path}/cancel`));
    } catch (e) {
      message.textContent = e.message;
    } finally {
      cancel.disabled = false;
    }
  });

  (async () => {
    try {
      await refresh();
    } catch (e) {
      clear(view).append(h("section", { class: "card", id: "not-found" },
        h("h1", {}, e.status === 404 ? "Job not found" : "Could not load the job"),
        h("p", {}, e.message), h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs"))));
      return;
    }
    try {
      charts.load((await get(`${path}/metrics`)).items);
    } catch (e) {
      message.textContent = e.message;
    }
    if (gone) return;
    stop = follow(`${path}/events`, {
      onEvent,
      onOpen: () => { if (message.textContent.startsWith("event stream")) message.textContent = ""; },
      onError: (e) => { if (!gone) message.textContent = `event stream: ${e.message} (retrying)`; },
    });
  })();

  return () => { gone = true; if (stop) stop(); };
}

/** The report's table for best and last: accuracy with its 95% interval (the report's ci95, else Wilson). */
function evaluationTable(final, student) {
  const body = h("tbody");
  for (const which of ["best", "last"]) {
    const result = final[which];
    if (!result) continue;
    for (const row of result.rows || []) {
      const ci = Array.isArray(row.ci95) && row.ci95.length === 2 ? row.ci95 : wilson(row.accuracy, row.n);
      const worst = row.worst_class;
      body.append(h("tr", { "data-checkpoint": which, "data-attack": row.attack },
        h("td", { "data-label": "Checkpoint" }, `${which}${result.epoch ? ` (epoch ${result.epoch})` : ""}`),
        h("td", { "data-label": "Attack" }, row.attack),
        h("td", { "data-label": "Accuracy", class: "num accuracy" }, pct(row.accuracy)),
        h("td", { "data-label": "95% interval", class: "num" }, ci ? `${pct(ci[0])} – ${pct(ci[1])}` : "–"),
        h("td", { "data-label": "n", class: "num" }, row.n ?? "–"),
        h("td", { "data-label": "Worst class", class: "num" },
          worst && typeof worst === "object" ? `${worst.class}: ${pct(worst.accuracy)}` : "–")));
    }
  }
  return h("div", { class: "table-wrap" }, h("table", { class: "evaluation", "data-student": student || "" },
    h("thead", {}, h("tr", {}, ["Checkpoint", "Attack", "Accuracy", "95% interval", "n", "Worst class"].map((t) => h("th", {}, t)))),
    body));
}

/** A several-student report's paired comparisons against its reference student (McNemar). */
function comparisonTable(comparisons) {
  const rows = comparisons.results.map((r) => h("tr", { "data-student": r.student, "data-attack": r.attack || "" },
    h("td", { "data-label": "Student" }, r.student),
    h("td", { "data-label": "Attack" }, r.attack || "–"),
    r.error
      ? h("td", { "data-label": "Difference", colspan: "3" }, r.error)
      : [h("td", { "data-label": "Difference", class: "num" }, `${r.diff >= 0 ? "+" : ""}${(100 * r.diff).toFixed(1)} pts`),
        h("td", { "data-label": "p", class: "num" }, num(r.p_value, 3)),
        h("td", { "data-label": "Significant at 5%" }, r.significant_at_5pct ? "yes" : "no")]));
  return h("div", { class: "comparisons" },
    h("h3", {}, `Against ${comparisons.reference} (${comparisons.checkpoint || "best"} checkpoints)`),
    h("p", { class: "muted small" }, comparisons.test || ""),
    h("div", { class: "table-wrap" }, h("table", { class: "comparison" },
      h("thead", {}, h("tr", {}, ["Student", "Attack", "Difference", "p", "Significant at 5%"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows))));
}
