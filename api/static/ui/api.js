// The API, called from this origin with the key kept in this tab's sessionStorage (never a URL or cookie).

const KEY = "rd-api-key";
export const BASE = new URL("../", window.location.href); // the API root, wherever the app is mounted

export function apiKey() {
  return window.sessionStorage.getItem(KEY);
}

export function setApiKey(key) {
  if (key) window.sessionStorage.setItem(KEY, key);
  else window.sessionStorage.removeItem(KEY);
}

export function url(path, query = {}) {
  const u = new URL(path.replace(/^\//, ""), BASE);
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== "") u.searchParams.set(k, String(v));
  }
  return u;
}

export function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

/** An error answer of the API: ``detail`` (a sentence) and ``errors`` (bad fields, on 422s). */
export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.errors = (body && Array.isArray(body.errors)) ? body.errors : [];
  }
}

export async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { body = null; }
  const error = new ApiError(response.status, body);
  if (response.status === 401) window.dispatchEvent(new CustomEvent("rd-unauthorized"));
  return error;
}

/** JSON from the API; throws ApiError for any non-2xx answer. */
export async function request(method, path, { query, json, signal, headers } = {}) {
  const init = { method, headers: authHeaders({ Accept: "application/json", ...headers }), signal, cache: "no-store" };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(url(path, query), init);
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

export const get = (path, query, signal) => request("GET", path, { query, signal });

/** Multipart upload with progress (fetch has no upload progress): resolves with the created row. */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url(path));
    for (const [k, v] of Object.entries(authHeaders({ Accept: "application/json" }))) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { body = null; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        if (xhr.status === 401) window.dispatchEvent(new CustomEvent("rd-unauthorized"));
        reject(new ApiError(xhr.status, body));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, { detail: "the upload failed: the server could not be reached" }));
    xhr.send(form);
  });
}

/** Download one file with the key in the header, then hand it to the browser as a Blob. */
export async function download(path, filename) {
  const response = await fetch(url(path), { headers: authHeaders(), cache: "no-store" });
  if (!response.ok) throw await errorFrom(response);
  const blob = await response.blob();
  const href = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = href;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
}

/** A text file of the API (e.g. a model card), read with the key in the header. */
export async function getText(path) {
  const response = await fetch(url(path), { headers: authHeaders(), cache: "no-store" });
  if (!response.ok) throw await errorFrom(response);
  return response.text();
}
