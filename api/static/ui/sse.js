// Server-sent events over fetch(): EventSource cannot send the Authorization header.
// Parses the text/event-stream format itself and reconnects with Last-Event-ID until the server ends
// the stream with an "end" event (the job finished) or the caller aborts.

import { authHeaders, errorFrom, url } from "./api.js";

/**
 * Follow ``path``'s event stream. ``onEvent({type, id, data})`` gets every message (data parsed as JSON).
 * Returns a function that stops following. ``onOpen()`` hears each (re)connection, ``onError(error)`` a
 * failed one. A dropped or failed connection is tried again after ``retryMs`` (the server's ``retry:``
 * field wins) with ``Last-Event-ID``: the server goes on after the last event this page saw.
 */
export function follow(path, { onEvent, onOpen, onError, onEnd, retryMs = 2000 }) {
  const controller = new AbortController();
  let lastId = null;
  let ended = false;
  let delay = retryMs;

  async function connect() {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    const response = await fetch(url(path), { headers, signal: controller.signal, cache: "no-store" });
    if (!response.ok) throw await errorFrom(response);
    if (onOpen) onOpen();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // Messages end with a blank line; lines end with \n, \r\n or \r.
      const parts = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = parts.pop();
      for (const block of parts) dispatch(block);
      if (ended) { controller.abort(); return; }
    }
  }

  function dispatch(block) {
    let type = "message";
    const data = [];
    let id = null;
    for (const line of block.split(/\r\n|\n|\r/)) {
      if (!line || line.startsWith(":")) continue; // comment (keep-alive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
      else if (field === "id" && !value.includes("\0")) id = value;
      else if (field === "retry" && /^\d+$/.test(value)) delay = Number(value);
    }
    if (id !== null) lastId = id;
    if (!data.length) return;
    let parsed;
    try { parsed = JSON.parse(data.join("\n")); } catch { parsed = data.join("\n"); }
    if (type === "end") ended = true;
    onEvent({ type, id, data: parsed });
    if (type === "end" && onEnd) onEnd(parsed);
  }

  (async () => {
    while (!ended && !controller.signal.aborted) {
      try {
        await connect();
      } catch (error) {
        if (controller.signal.aborted) return;
        if (onError) onError(error);
        if (error.status && error.status !== 429 && error.status < 500) return; // 401/404: retrying won't help
      }
      if (ended || controller.signal.aborted) return;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  })();

  return () => controller.abort();
}
