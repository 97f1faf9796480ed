// The /v1 API with the key as a Bearer header. The key comes from `#key=...` (a fragment is
// never sent to the server) and is kept in localStorage.

const KEY_STORAGE = "ddpm-jobs.api-key";

export class ApiError extends Error {
  constructor(status, detail) {
    super(formatDetail(detail) || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

// FastAPI errors: {"detail": "text"} or {"detail": [{"loc": ["body", "training", "steps"], "msg": ...}]}.
export function formatDetail(detail) {
  if (detail === null || detail === undefined) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => {
        const loc = (e.loc || []).filter((p, i) => !(i === 0 && p === "body")).join(".");
        return loc ? `${loc}: ${e.msg}` : e.msg;
      })
      .join("\n");
  }
  return JSON.stringify(detail);
}

/** Take `#key=...` from the address, store it and remove it from the address bar and history. */
export function adoptKeyFromHash() {
  const hash = location.hash.replace(/^#/, "");
  if (!hash.startsWith("key=")) return false;
  const key = new URLSearchParams(hash).get("key");
  if (key) setKey(key.trim());
  history.replaceState(null, "", `${location.pathname}${location.search}#/`);
  return Boolean(key);
}

export function getKey() {
  try {
    return localStorage.getItem(KEY_STORAGE);
  } catch {
    return null; // storage disabled: the key lives in memory for this page only
  }
}

let memoryKey = null;

export function setKey(key) {
  memoryKey = key;
  try {
    localStorage.setItem(KEY_STORAGE, key);
  } catch {
    /* storage disabled; memoryKey keeps it for this page */
  }
}

export function forgetKey() {
  memoryKey = null;
  try {
    localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* nothing stored */
  }
}

export function currentKey() {
  return getKey() || memoryKey;
}

/**
 * Call the API. Returns the parsed JSON, or the Response itself with `raw: true` (streams,
 * files). Any non-2xx answer throws ApiError; a 401 also fires `ddpm:unauthorized`.
 */
export async function api(path, { method = "GET", body, headers = {}, signal, raw = false } = {}) {
  const key = currentKey();
  if (!key) {
    window.dispatchEvent(new CustomEvent("ddpm:unauthorized", { detail: "no API key" }));
    throw new ApiError(401, "no API key");
  }
  const init = {
    method,
    signal,
    cache: "no-store",
    headers: { Authorization: `Bearer ${key}`, Accept: "application/json", ...headers },
  };
  if (body !== undefined) {
    init.body = typeof body === "string" ? body : JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, init);
  if (!res.ok) {
    let detail = `${res.status} ${res.statusText}`;
    try {
      detail = (await res.json()).detail ?? detail;
    } catch {
      /* not JSON: keep the status line */
    }
    if (res.status === 401) window.dispatchEvent(new CustomEvent("ddpm:unauthorized", { detail }));
    throw new ApiError(res.status, detail);
  }
  if (raw) return res;
  if (res.status === 204) return null;
  return res.json();
}

/** Read a response body to a Blob, reporting progress (0..1, or null when the size is unknown). */
export async function readBlob(res, onProgress) {
  const total = Number(res.headers.get("Content-Length")) || 0;
  if (!res.body || !onProgress) return res.blob();
  const reader = res.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    onProgress(total ? received / total : null, received);
  }
  return new Blob(chunks, { type: res.headers.get("Content-Type") || "application/octet-stream" });
}

/** The file name from Content-Disposition, or `fallback`. */
export function downloadName(res, fallback) {
  const header = res.headers.get("Content-Disposition") || "";
  const star = header.match(/filename\*=UTF-8''([^;]+)/i);
  if (star) return decodeURIComponent(star[1]);
  const plain = header.match(/filename="?([^";]+)"?/i);
  return plain ? plain[1] : fallback;
}

/** Hand a Blob to the browser as a download named `name`. */
export function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** sha256 of a Blob as hex, or null where the browser offers no WebCrypto (plain http off localhost). */
export async function sha256Hex(blob) {
  if (!globalThis.crypto?.subtle) return null;
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}
