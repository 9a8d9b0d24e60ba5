// The dashboard's entry point: sign-in, navigation and the #fragment router.

import { apiKey, get, setApiKey } from "./api.js";
import { clear, h } from "./dom.js";
import { showJob } from "./job.js";
import { showJobs } from "./jobs.js";
import { showDatasets, showTeachers } from "./library.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
let leave = null; // the current view's clean-up (stop streams and timers)

function signIn(message) {
  nav.hidden = true;
  const key = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
    placeholder: "rd_…", required: true,
  });
  const error = h("p", { class: "error", id: "sign-in-error", role: "alert" }, message || "");
  const form = h("form", { class: "card narrow", id: "sign-in" },
    h("h1", {}, "Sign in"),
    h("p", {}, "Paste an API key. It stays in this browser tab only (sessionStorage) and is sent as an ",
      h("code", {}, "Authorization: Bearer"), " header; closing the tab forgets it."),
    h("label", { for: "api-key" }, "API key"), key,
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setApiKey(key.value.trim());
    try {
      await get("/v1/jobs", { limit: 1 });
    } catch (e) {
      setApiKey(null);
      error.textContent = e.status === 401 ? "This key was not accepted (unknown or revoked)." : e.message;
      return;
    }
    route();
  });
  clear(view).append(form);
  key.focus();
}

async function route() {
  if (leave) { leave(); leave = null; }
  if (!apiKey()) { signIn(); return; }
  nav.hidden = false;
  const path = window.location.hash.replace(/^#/, "") || "/jobs";
  const parts = path.split("/").filter(Boolean);
  for (const a of nav.querySelectorAll("a[data-nav]")) a.classList.toggle("active", a.dataset.nav === parts[0]);
  clear(view);
  if (parts[0] === "jobs" && parts[1]) leave = showJob(view, decodeURIComponent(parts[1]));
  else if (parts[0] === "teachers") leave = showTeachers(view);
  else if (parts[0] === "datasets") leave = showDatasets(view);
  else leave = showJobs(view);
}

document.getElementById("sign-out").addEventListener("click", () => {
  setApiKey(null);
  window.location.hash = "#/jobs";
  route();
});
window.addEventListener("rd-unauthorized", () => {
  if (document.getElementById("sign-in")) return; // the sign-in form says so itself
  setApiKey(null);
  if (leave) { leave(); leave = null; }
  signIn("The API key was refused (unknown or revoked): sign in again.");
});
window.addEventListener("hashchange", route);
route();
