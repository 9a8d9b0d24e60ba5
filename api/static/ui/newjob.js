// The new-job form. The API validates everything: its 422 answers are shown next to the fields they name
// (``errors[].loc``, e.g. ["body", "epochs"] or ["body", "students", 1, "method"]), a 422 without field
// list (a combination the method refuses) above the form.

import { get, request } from "./api.js";
import { h } from "./dom.js";

const STUDENTS = ["tiny_cnn", "cnn_a", "conv_small", "mobilenet_v2", "preact_resnet18", "resnet18", "resnet34",
  "resnet50", "wide_resnet", "wrn_34_10"];
const METHODS = ["rslad", "sat", "trades", "ard", "iad", "mart", "natural"];
const ATTACKS = ["clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "aa", "square"];
const DEFAULT_ATTACKS = new Set(["clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "aa"]);
const EXPORTS = ["safetensors", "torchscript", "export", "onnx"];
const NUMBERS = [
  ["epochs", "Epochs", "method default"],
  ["eps", "eps (L∞, images in [0, 1])", "8/255"],
  ["batch_size", "Batch size", "128"],
  ["lr", "Learning rate", "0.1 × batch/128"],
  ["train_subset", "Training images (subset)", "all"],
  ["val_size", "Validation images", "1000"],
  ["n_eval", "Test images evaluated", "all"],
  ["seed", "Seed", "0"],
];

function errorSlot(field) {
  return h("p", { class: "field-error", "data-error-for": field, role: "alert" });
}

function field(name, label, control) {
  control.id = `f-${name.replace(/\./g, "-")}`;
  control.dataset.field = name;
  return h("div", { class: "field", "data-field-box": name }, h("label", { for: control.id }, label), control, errorSlot(name));
}

/** A typed value: "" is left out, a number is a number, "8/255" is divided, anything else goes as typed. */
function numberValue(text) {
  const t = text.trim();
  if (!t) return undefined;
  const ratio = t.match(/^(\d+(?:\.\d+)?)\s*\/\s*(\d+(?:\.\d+)?)$/);
  if (ratio) return Number(ratio[1]) / Number(ratio[2]);
  const n = Number(t);
  return Number.isFinite(n) ? n : t;
}

function datalist(id, values) {
  return h("datalist", { id }, values.map((v) => h("option", { value: v })));
}

export function newJobForm(onCreated) {
  const idempotencyKey = window.crypto.randomUUID ? window.crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
  const teacher = h("select", { name: "teacher_id" }, h("option", { value: "" }, "none (methods without a teacher)"));
  const dataset = h("select", { name: "dataset" });
  const rows = h("div", { class: "students", id: "students" });
  const formError = h("p", { class: "error", id: "job-form-error", role: "alert" });
  const inputs = Object.fromEntries(NUMBERS.map(([name]) => [name, h("input", { type: "text", inputmode: "decimal", name, autocomplete: "off" })]));
  const methodParams = h("input", { type: "text", name: "method_params", placeholder: '{"steps": 10}', autocomplete: "off" });
  const device = h("select", { name: "device" }, ["auto", "cpu", "cuda"].map((d) => h("option", { value: d }, d)));
  const degenerate = h("input", { type: "checkbox", name: "allow_degenerate" });
  const checks = (name, values, checked) => h("div", { class: "checks", id: `f-${name}`, "data-field": name },
    values.map((v) => h("label", { class: "check" }, h("input", { type: "checkbox", name, value: v, checked: checked(v) }), v)));
  const attacks = checks("attacks", ATTACKS, (v) => DEFAULT_ATTACKS.has(v));
  const exportsBox = checks("exports", EXPORTS, () => true);

  function addStudent(student = "", method = "") {
    const row = h("div", { class: "student-row" },
      h("input", { type: "text", name: "student", list: "dl-students", value: student, placeholder: "student, e.g. resnet18", "aria-label": "student architecture" }),
      h("input", { type: "text", name: "method", list: "dl-methods", value: method, placeholder: "method, e.g. rslad", "aria-label": "method" }),
      h("input", { type: "text", name: "name", placeholder: "name (optional)", "aria-label": "student name" }),
      h("button", { type: "button", class: "link", onclick: () => { row.remove(); renumber(); } }, "remove"),
      h("p", { class: "field-error" }));
    rows.append(row);
    renumber();
  }

  /** Name each row's inputs as the API's error locations will: student / students.N.student. */
  function renumber() {
    const all = [...rows.querySelectorAll(".student-row")];
    all.forEach((row, i) => {
      for (const input of row.querySelectorAll("input")) {
        input.dataset.field = all.length > 1 ? `students.${i}.${input.name}` : input.name;
      }
      row.querySelector(".field-error").dataset.errorFor = all.length > 1 ? `students.${i}` : "students";
      row.querySelector("input[name=name]").hidden = all.length === 1;
      row.querySelector("button").hidden = all.length === 1;
    });
  }

  const form = h("form", { class: "card", id: "new-job-form", novalidate: true },
    h("h2", {}, "New job"),
    datalist("dl-students", STUDENTS), datalist("dl-methods", METHODS),
    h("div", { class: "grid" },
      field("teacher_id", "Teacher", teacher),
      field("dataset", "Dataset", dataset)),
    h("fieldset", {}, h("legend", {}, "Student(s) and method(s)"), rows,
      h("button", { type: "button", class: "link", id: "add-student", onclick: () => addStudent() }, "+ add a student (trained in the same pass)")),
    h("div", { class: "grid" },
      NUMBERS.map(([name, label, hint]) => { inputs[name].placeholder = hint; return field(name, label, inputs[name]); }),
      field("method_params", "Method parameters (JSON)", methodParams),
      field("device", "Device", device)),
    h("fieldset", {}, h("legend", {}, "Attacks evaluated"), attacks, errorSlot("attacks")),
    h("fieldset", {}, h("legend", {}, "Exports"), exportsBox, errorSlot("exports")),
    h("label", { class: "check" }, degenerate, " keep a student at chance level (allow_degenerate)"),
    errorSlot("allow_degenerate"),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", id: "submit-job" }, "Start the job")),
    formError);
  addStudent("tiny_cnn", "rslad");

  (async () => {
    try {
      const [teachers, datasets] = await Promise.all([get("/v1/teachers"), get("/v1/datasets")]);
      for (const t of teachers.items) teacher.append(h("option", { value: t.id }, `${t.name} (${t.arch || t.format}, ${t.num_classes} classes)`));
      for (const d of datasets.uploaded) dataset.append(h("option", { value: d.id }, `${d.name} (uploaded, ${d.n_train} images)`));
      for (const d of datasets.builtin.filter((b) => b.available)) dataset.append(h("option", { value: d.name }, `${d.name} (builtin)`));
      if (teachers.items.length) teacher.value = teachers.items[0].id;
      form.setAttribute("data-ready", "true"); // (form.dataset is the control named "dataset")
    } catch (e) {
      formError.textContent = e.message;
    }
  })();

  function body() {
    const out = { dataset: dataset.value };
    if (teacher.value) out.teacher_id = teacher.value;
    for (const [name, input] of Object.entries(inputs)) {
      const value = numberValue(input.value);
      if (value !== undefined) out[name] = value;
    }
    if (methodParams.value.trim()) out.method_params = JSON.parse(methodParams.value);
    if (device.value !== "auto") out.device = device.value;
    out.attacks = [...attacks.querySelectorAll("input:checked")].map((c) => c.value);
    out.exports = [...exportsBox.querySelectorAll("input:checked")].map((c) => c.value);
    if (degenerate.checked) out.allow_degenerate = true;
    const specs = [...rows.querySelectorAll(".student-row")].map((row) => {
      const value = (n) => row.querySelector(`input[name=${n}]`).value.trim();
      const spec = { student: value("student"), method: value("method") };
      if (value("name")) spec.name = value("name");
      return spec;
    });
    if (specs.length === 1) {
      out.student = specs[0].student;
      out.method = specs[0].method;
    } else {
      out.students = specs.map((s) => (out.method_params ? { ...s, method_params: out.method_params } : s));
      delete out.method_params;
    }
    return out;
  }

  function showErrors(error) {
    let placed = 0;
    for (const item of error.errors) {
      const loc = item.loc.filter((p, i) => !(i === 0 && ["body", "query", "path", "header"].includes(p))).map(String);
      let slot = null;
      for (let n = loc.length; n > 0 && !slot; n -= 1) {
        const key = CSS.escape(loc.slice(0, n).join("."));
        slot = form.querySelector(`[data-error-for="${key}"]`);
        const input = slot ? null : form.querySelector(`[data-field="${key}"]`);
        if (input) slot = input.closest(".student-row, [data-field-box]").querySelector(".field-error");
      }
      if (!slot) continue;
      slot.textContent = slot.textContent ? `${slot.textContent}; ${item.msg}` : item.msg;
      const box = slot.closest("[data-field-box]") || slot.parentElement;
      box.classList.add("invalid");
      placed += 1;
    }
    if (placed < error.errors.length || !error.errors.length) formError.textContent = error.message;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    formError.textContent = "";
    for (const slot of form.querySelectorAll(".field-error")) slot.textContent = "";
    for (const box of form.querySelectorAll(".invalid")) box.classList.remove("invalid");
    let payload;
    try {
      payload = body();
    } catch {
      form.querySelector('[data-error-for="method_params"]').textContent = "not valid JSON";
      return;
    }
    const submit = form.querySelector("#submit-job");
    submit.disabled = true;
    try {
      const job = await request("POST", "/v1/jobs", { json: payload, headers: { "Idempotency-Key": idempotencyKey } });
      onCreated(job);
    } catch (e) {
      if (e.status === 422) showErrors(e);
      else formError.textContent = e.message;
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
