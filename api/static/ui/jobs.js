// The jobs page: the tenant's jobs newest first, a status filter, cursor paging and the new-job form.

import { get } from "./api.js";
import { clear, duration, h, progressCell, statusBadge, studentsOf, TERMINAL, when } from "./dom.js";
import { newJobForm } from "./newjob.js";

const STATUSES = ["", "queued", "running", "evaluating", "succeeded", "failed", "cancelled"];
const PAGE_SIZES = [10, 20, 50, 100];
const DEFAULT_PAGE = 20;
const REFRESH_MS = 5000;

export function showJobs(view) {
  const state = { status: "", limit: DEFAULT_PAGE, cursors: [null], page: 0, next: null };
  const filter = h("select", { id: "status-filter", name: "status" },
    STATUSES.map((s) => h("option", { value: s }, s || "all")));
  const size = h("select", { id: "page-size", name: "limit", "aria-label": "jobs per page" },
    PAGE_SIZES.map((n) => h("option", { value: String(n) }, `${n} per page`)));
  size.value = String(state.limit);
  const body = h("tbody", { id: "jobs-body" });
  const info = h("p", { class: "muted small", id: "jobs-info" });
  const newer = h("button", { type: "button", id: "newer", disabled: true }, "← Newer");
  const older = h("button", { type: "button", id: "older", disabled: true }, "Older →");
  const error = h("p", { class: "error", role: "alert" });
  const formBox = h("div", { hidden: true });
  const toggle = h("button", { type: "button", class: "primary", id: "new-job" }, "New job");
  let timer = null;
  let gone = false;

  view.append(
    h("div", { class: "heading" }, h("h1", {}, "Jobs"), toggle),
    formBox,
    h("div", { class: "toolbar" }, h("label", { for: "status-filter" }, "Status "), filter, size, info),
    error,
    h("div", { class: "table-wrap" }, h("table", { class: "jobs" },
      h("thead", {}, h("tr", {}, ["Created", "Job", "Status", "Student(s)", "Method(s)", "Dataset", "Progress", "ETA"]
        .map((t) => h("th", {}, t)))),
      body)),
    h("div", { class: "pager" }, newer, older),
  );

  let latest = 0; // only the newest request's answer is shown (a filter change can overtake a refresh)
  async function load() {
    clearTimeout(timer);
    const mine = ++latest;
    try {
      const page = await get("/v1/jobs", { status: state.status, limit: state.limit, cursor: state.cursors[state.page] });
      if (gone || mine !== latest) return;
      error.textContent = "";
      render(page);
      state.next = page.next_cursor;
      newer.disabled = state.page === 0;
      older.disabled = !state.next;
      if (page.items.some((j) => !TERMINAL.has(j.status))) timer = setTimeout(load, REFRESH_MS);
    } catch (e) {
      if (!gone && mine === latest) error.textContent = e.message;
    }
  }

  function render(page) {
    clear(body);
    info.textContent = `page ${state.page + 1}, ${page.items.length} job(s)`;
    if (!page.items.length) {
      body.append(h("tr", {}, h("td", { colspan: "8", class: "muted" }, "No jobs here yet.")));
      return;
    }
    for (const job of page.items) {
      const students = studentsOf(job);
      const eta = job.progress && !TERMINAL.has(job.status) ? duration(job.progress.eta_s) : "–";
      body.append(h("tr", { "data-job-id": job.id },
        h("td", { "data-label": "Created" }, when(job.created_at)),
        h("td", { "data-label": "Job" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id.slice(0, 12))),
        h("td", { "data-label": "Status" }, statusBadge(job.status)),
        h("td", { "data-label": "Student(s)" }, [...new Set(students.map((s) => s.student))].join(", ")),
        h("td", { "data-label": "Method(s)" }, [...new Set(students.map((s) => s.method))].join(", ")),
        h("td", { "data-label": "Dataset" }, job.dataset || job.dataset_id || "–"),
        h("td", { "data-label": "Progress" }, progressCell(job)),
        h("td", { "data-label": "ETA" }, eta)));
    }
  }

  const restart = () => {
    Object.assign(state, { status: filter.value, limit: Number(size.value), cursors: [null], page: 0 });
    load();
  };
  filter.addEventListener("change", restart);
  size.addEventListener("change", restart);
  older.addEventListener("click", () => {
    if (!state.next) return;
    state.cursors[state.page + 1] = state.next;
    state.page += 1;
    load();
  });
  newer.addEventListener("click", () => {
    if (state.page === 0) return;
    state.page -= 1;
    load();
  });
  toggle.addEventListener("click", () => {
    if (formBox.hidden) {
      clear(formBox).append(newJobForm((job) => { window.location.hash = `#/jobs/${encodeURIComponent(job.id)}`; }));
      formBox.hidden = false;
      toggle.textContent = "Close the form";
    } else {
      formBox.hidden = true;
      toggle.textContent = "New job";
    }
  });

  load();
  return () => { gone = true; clearTimeout(timer); };
}
