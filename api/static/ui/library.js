// The teachers and datasets pages: the tenant's uploads, an upload form with a progress bar, delete.

import { get, request, upload } from "./api.js";
import { bytes, clear, h, pct, when } from "./dom.js";

/** An upload form: a file plus text fields, sent as multipart with the field names the API takes. */
function uploadForm({ id, title, fileLabel, accept, fields, path, onDone }) {
  const file = h("input", { type: "file", name: "file", id: `${id}-file`, accept, required: true });
  const bar = h("progress", { max: "1", value: "0", id: `${id}-progress`, hidden: true });
  const status = h("p", { class: "small muted", id: `${id}-status`, role: "status" });
  const error = h("p", { class: "error", id: `${id}-error`, role: "alert" });
  const controls = fields.map(([name, label, attrs]) => {
    const control = attrs.options
      ? h("select", { name, id: `${id}-${name}` }, attrs.options.map(([v, t]) => h("option", { value: v }, t)))
      : h("input", { type: "text", name, id: `${id}-${name}`, autocomplete: "off", ...attrs });
    return h("div", { class: "field" }, h("label", { for: control.id }, label), control);
  });
  const submit = h("button", { type: "submit", class: "primary", id: `${id}-submit` }, "Upload");
  const form = h("form", { class: "card", id, novalidate: true },
    h("h2", {}, title),
    h("div", { class: "field" }, h("label", { for: file.id }, fileLabel), file),
    h("div", { class: "grid" }, controls),
    h("div", { class: "actions" }, submit, bar), status, error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    if (!file.files.length) { error.textContent = "Choose a file first."; return; }
    const data = new FormData();
    data.append("file", file.files[0]);
    for (const [name] of fields) {
      const value = form.elements[name].value.trim();
      if (value) data.append(name, value);
    }
    submit.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    status.textContent = "Uploading…";
    try {
      const row = await upload(path, data, (fraction) => {
        bar.value = fraction;
        status.textContent = fraction < 1 ? `Uploading… ${pct(fraction, 0)}` : "Uploaded; the server is checking the file…";
      });
      status.textContent = `Kept: ${row.name} (${row.id}).`;
      form.reset();
      onDone();
    } catch (e) {
      const fieldsNamed = e.errors.map((x) => `${x.loc.slice(1).join(".")}: ${x.msg}`);
      error.textContent = fieldsNamed.length ? fieldsNamed.join("; ") : e.message;
      status.textContent = "";
      bar.hidden = true;
    } finally {
      submit.disabled = false; // after a success the bar stays, full, beside the "Kept" line
    }
  });
  return form;
}

function listPage(view, { title, id, form, columns, load }) {
  const body = h("tbody", { id: `${id}-body` });
  const error = h("p", { class: "error", role: "alert" });
  const extra = h("div");
  view.append(h("div", { class: "heading" }, h("h1", {}, title)), form, error,
    h("div", { class: "table-wrap" }, h("table", { class: id },
      h("thead", {}, h("tr", {}, [...columns, ""].map((c) => h("th", {}, c)))), body)), extra);
  async function refresh() {
    try {
      const rows = await load(extra);
      clear(body);
      if (!rows.length) body.append(h("tr", {}, h("td", { colspan: String(columns.length + 1), class: "muted" }, "Nothing uploaded yet.")));
      for (const { id: rowId, cells, remove } of rows) {
        const del = h("button", {
          type: "button", class: "link danger", "data-delete": rowId,
          onclick: async () => {
            if (!window.confirm(`Delete ${rowId}?`)) return;
            try { await remove(); error.textContent = ""; refresh(); } catch (e) { error.textContent = e.message; }
          },
        }, "Delete");
        body.append(h("tr", { "data-id": rowId }, cells.map(([label, value]) => h("td", { "data-label": label }, value)), h("td", {}, del)));
      }
    } catch (e) {
      error.textContent = e.message;
    }
  }
  return refresh;
}

/** What the upload's accuracy check found (e.g. "a job on this teacher will fail its teacher check"). */
function teacherWarnings(teacher) {
  const check = (teacher.probe && teacher.probe.accuracy_check) || {};
  const warnings = Array.isArray(check.warnings) ? check.warnings : [];
  return warnings.length ? h("ul", { class: "warnings small" }, warnings.map((w) => h("li", {}, w))) : null;
}

export function showTeachers(view) {
  let refresh = () => {};
  const form = uploadForm({
    id: "teacher-upload", title: "Upload a teacher", accept: ".pt,.pth,.pt2,.safetensors,.bin",
    fileLabel: "Model file (TorchScript, torch.export .pt2, state_dict or safetensors)",
    path: "/v1/teachers",
    fields: [
      ["name", "Name", { placeholder: "the file's name" }],
      ["arch", "Architecture (state_dict / safetensors)", { placeholder: "e.g. resnet18" }],
      ["format", "Format", { options: [["auto", "auto"], ["torchscript", "torchscript"], ["export", "export"], ["state_dict", "state_dict"], ["safetensors", "safetensors"]] }],
      ["dataset", "Dataset (sets the classes)", { placeholder: "cifar10 or an uploaded id" }],
      ["num_classes", "Classes", { inputmode: "numeric" }],
      ["normalize", "Normalisation", { placeholder: "cifar10 or m1,m2,m3;s1,s2,s3" }],
      ["claimed_accuracy", "Claimed clean accuracy (0-1)", { inputmode: "decimal" }],
    ],
    onDone: () => refresh(),
  });
  refresh = listPage(view, {
    title: "Teachers", id: "teachers", form,
    columns: ["Name", "Architecture", "Format", "Classes", "Parameters", "Size", "Clean accuracy", "Uploaded"],
    load: async () => (await get("/v1/teachers")).items.map((t) => ({
      id: t.id,
      remove: () => request("DELETE", `/v1/teachers/${encodeURIComponent(t.id)}`),
      cells: [["Name", h("div", {}, h("span", { title: t.id }, t.name), teacherWarnings(t))], ["Architecture", t.arch || "–"], ["Format", t.format],
        ["Classes", t.num_classes], ["Parameters", t.num_params.toLocaleString()], ["Size", bytes(t.size_bytes)],
        ["Clean accuracy", t.probe && t.probe.accuracy_check ? pct(t.probe.accuracy_check.accuracy) : "–"],
        ["Uploaded", when(t.created_at)]],
    })),
  });
  refresh();
  return () => {};
}

export function showDatasets(view) {
  let refresh = () => {};
  const form = uploadForm({
    id: "dataset-upload", title: "Upload a dataset", accept: ".npz",
    fileLabel: ".npz with x (images), y (labels), optional x_test / y_test",
    path: "/v1/datasets",
    fields: [["name", "Name", { placeholder: "the file's name" }]],
    onDone: () => refresh(),
  });
  refresh = listPage(view, {
    title: "Datasets", id: "datasets", form,
    columns: ["Name", "Classes", "Training images", "Test images", "Size", "Uploaded"],
    load: async (extra) => {
      const list = await get("/v1/datasets");
      clear(extra).append(h("section", { class: "card" }, h("h2", {}, "Builtin datasets"),
        h("ul", {}, list.builtin.map((b) => h("li", {}, h("code", {}, b.name), ` – ${b.note}, ${b.num_classes} classes`,
          b.available ? "" : h("span", { class: "muted" }, " (not installed on this server)"))))));
      return list.uploaded.map((d) => ({
        id: d.id,
        remove: () => request("DELETE", `/v1/datasets/${encodeURIComponent(d.id)}`),
        cells: [["Name", h("span", { title: d.id }, d.name)], ["Classes", d.num_classes], ["Training images", d.n_train],
          ["Test images", d.n_test], ["Size", bytes(d.size_bytes)], ["Uploaded", when(d.created_at)]],
      }));
    },
  });
  refresh();
  return () => {};
}
