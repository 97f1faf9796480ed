// Server-Sent Events over fetch(): EventSource cannot send an Authorization header, so the
// stream is read from a ReadableStream and parsed here, following the WHATWG "event stream
// interpretation" rules. Reconnects send Last-Event-ID, so the server resumes without gaps.

import { api, ApiError } from "./api.js";
import { sleep } from "./util.js";

export class SSEParser {
  constructor(onEvent, onComment = () => {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.buffer = "";
    this.lastEventId = "";
    this.retry = null;
    this.type = "";
    this.data = "";
  }

  /** Feed decoded text; complete events are dispatched as they end. */
  push(text) {
    this.buffer += text;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (!match) break;
      // A lone "\r" at the end may be the first half of "\r\n": wait for the next chunk.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      this.line(line);
    }
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) {
      this.onComment(line.slice(1));
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data += `${value}\n`;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }

  dispatch() {
    const { type, data } = this;
    this.type = "";
    this.data = "";
    if (data === "") return;
    this.onEvent({ type: type || "message", data: data.slice(0, -1), lastEventId: this.lastEventId });
  }
}

const IDLE_TIMEOUT_MS = 45_000; // the server sends keep-alive comments well within this
const MAX_BACKOFF_MS = 15_000;

/**
 * Follow an SSE route until `close()`, `isDone()` after the stream ends, or a 404 (the route
 * does not exist: `onUnsupported`). Handlers: onEvent({type, data, lastEventId}),
 * onState("connecting" | "live" | "reconnecting" | "ended" | "unsupported" | "error").
 * `lastEventId` starts the stream after that event (what the page has already read).
 */
export function followEvents(
  path,
  { onEvent, onState = () => {}, onUnsupported = () => {}, isDone = () => false, lastEventId: startAfter = "" },
) {
  let closed = false;
  let current = null;
  let lastEventId = startAfter; // "" replays the whole history
  let retryMs = 1000;
  const stopped = new AbortController();

  async function connectOnce() {
    const abort = new AbortController();
    current = abort;
    let idleTimer = null;
    const resetIdle = () => {
      clearTimeout(idleTimer);
      idleTimer = setTimeout(() => abort.abort(), IDLE_TIMEOUT_MS); // a silent half-open socket
    };
    const headers = { Accept: "text/event-stream" };
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    try {
      const res = await api(path, { raw: true, headers, signal: abort.signal });
      onState("live");
      resetIdle();
      const parser = new SSEParser((event) => {
        lastEventId = event.lastEventId;
        onEvent(event);
      });
      parser.lastEventId = lastEventId; // an event without id: keeps the position (as EventSource does)
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        resetIdle();
        parser.push(value);
        if (parser.retry !== null) retryMs = parser.retry;
      }
    } finally {
      clearTimeout(idleTimer);
    }
  }

  (async () => {
    let failures = 0;
    onState("connecting");
    while (!closed) {
      try {
        await connectOnce();
        failures = 0;
      } catch (error) {
        if (closed) return;
        if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
          onState("unsupported");
          onUnsupported(error);
          return;
        }
        if (error instanceof ApiError && error.status === 401) {
          onState("error");
          return;
        }
        failures += 1;
      }
      if (closed) return;
      if (isDone()) {
        onState("ended");
        return;
      }
      onState("reconnecting");
      await sleep(Math.min(retryMs * 2 ** Math.min(failures, 4), MAX_BACKOFF_MS), stopped.signal);
    }
  })();

  return {
    close() {
      closed = true;
      stopped.abort();
      current?.abort();
    },
  };
}
