// Data sets: the user's uploads and sources, a drop zone (and a file picker) that uploads an
// archive with a progress bar, previews fetched with the key, statuses refreshed until each is
// ready or failed, and a delete button (two clicks: arm, then confirm).

import { api, ApiError, currentKey, formatDetail } from "../api.js";
import { card, el, fmtBytes, fmtNumber, fmtTime, shortId, toast } from "../util.js";

const ACTIVE_REFRESH_MS = 2000; // while a data set is uploading or preparing
const IDLE_REFRESH_MS = 15000;
const TERMINAL = new Set(["ready", "failed"]);
const ACCEPT = ".zip,.tar,.tar.gz,.tgz,application/zip,application/x-tar,application/gzip";

/** The archive's Content-Type from its first bytes (zip, gzip, tar), else from its name; null if neither. */
export async function archiveType(file) {
  const head = new Uint8Array(await file.slice(0, 512).arrayBuffer());
  const starts = (...bytes) => bytes.every((b, i) => head[i] === b);
  if (starts(0x50, 0x4b, 0x03, 0x04) || starts(0x50, 0x4b, 0x05, 0x06)) return "application/zip";
  if (starts(0x1f, 0x8b)) return "application/gzip";
  if (String.fromCharCode(...head.slice(257, 262)) === "ustar") return "application/x-tar";
  const name = file.name.toLowerCase();
  if (name.endsWith(".tar") && head.length === 512) return "application/x-tar";
  return null;
}

/**
 * POST the file as the raw body (its Content-Type from its bytes), reporting upload progress
 * (`onProgress(loaded, total)`). Resolves to the new data set; rejects with ApiError.
 */
export function uploadArchive(file, contentType, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const name = file.name.replace(/\.(zip|tar|tar\.gz|tgz)$/i, "") || file.name;
    xhr.open("POST", `/v1/datasets?${new URLSearchParams({ name: name.slice(0, 200) })}`);
    xhr.setRequestHeader("Authorization", `Bearer ${currentKey()}`);
    xhr.setRequestHeader("Content-Type", contentType);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size));
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(file.size, file.size);
        resolve(xhr.response);
        return;
      }
      const detail = xhr.response?.detail ?? `${xhr.status} ${xhr.statusText}`;
      if (xhr.status === 401) window.dispatchEvent(new CustomEvent("ddpm:unauthorized", { detail }));
      reject(new ApiError(xhr.status, detail));
    });
    xhr.addEventListener("error", () => reject(new Error("the connection broke off")));
    xhr.addEventListener("abort", () => reject(new Error("cancelled")));
    xhr.send(file);
  });
}

export function datasetBadge(dataset) {
  return el("span", { class: `badge status-${dataset.status}`, dataset: { status: dataset.status } }, dataset.status);
}

export function datasetsView(root) {
  let stopped = false;
  let timer = null;
  let datasets = [];
  const previews = new Map(); // data set id -> Promise of a blob: URL
  const armed = new Set(); // ids whose delete button was clicked once

  const input = el("input", { type: "file", id: "dataset-file", accept: ACCEPT, hidden: true });
  const pick = el("button", { type: "button", id: "dataset-pick", onclick: () => input.click() }, "Upload an archive");
  const bar = el("div", { class: "bar" });
  const progress = el(
    "div",
    { class: "progress status-running", id: "upload-progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100 },
    bar,
  );
  const progressText = el("div", { class: "progress-label", id: "upload-progress-text" });
  const uploadBox = el("div", { class: "upload-box", hidden: true }, progress, progressText);
  const drop = el(
    "div",
    { class: "drop-zone", id: "dataset-drop", tabindex: 0 },
    el("strong", {}, "Drop a .zip, .tar or .tar.gz of images here"),
    el("span", { class: "muted small" }, "or use the button. Folders: ", el("code", {}, "ddpm datasets upload FOLDER")),
    uploadBox,
  );
  const error = el("p", { class: "error", hidden: true });
  const tbody = el("tbody");
  const summary = el("span", { class: "muted" });

  root.replaceChildren(
    card(
      {},
      [el("h1", {}, "Data sets"), summary, el("div", { class: "spacer" }), pick, input],
      drop,
      error,
      el(
        "table",
        { class: "datasets", id: "dataset-table" },
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            el("th", { class: "col-preview" }, "Preview"),
            el("th", {}, "Data set"),
            el("th", {}, "Status"),
            el("th", { class: "num" }, "Images"),
            el("th", { class: "num" }, "Skipped"),
            el("th", { class: "num" }, "Size"),
            el("th", {}, "Created"),
            el("th", {}, ""),
          ),
        ),
        tbody,
      ),
    ),
  );

  input.addEventListener("change", () => {
    if (input.files.length) upload(input.files[0]);
    input.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer?.files?.[0];
    if (file) upload(file);
  });

  function setProgress(loaded, total) {
    const percent = total ? Math.min(100, Math.floor((100 * loaded) / total)) : 0;
    bar.style.width = `${percent}%`;
    progress.setAttribute("aria-valuenow", String(percent));
    progress.dataset.percent = String(percent);
    progressText.replaceChildren(el("span", {}, `${fmtBytes(loaded)} of ${fmtBytes(total)}`), el("span", {}, `${percent}%`));
  }

  async function upload(file) {
    error.hidden = true;
    let type;
    try {
      type = await archiveType(file);
    } catch {
      showError(`Cannot read ${file.name}: a folder? Upload folders with ddpm datasets upload FOLDER.`);
      return;
    }
    if (!type) {
      showError(`${file.name} is not a zip, tar or tar.gz archive.`);
      return;
    }
    pick.disabled = true;
    uploadBox.hidden = false;
    progress.className = "progress status-running";
    setProgress(0, file.size);
    try {
      const dataset = await uploadArchive(file, type, setProgress);
      progress.className = "progress status-succeeded";
      toast(`Uploaded ${file.name}; a worker prepares it next.`, "ok");
      datasets = [dataset, ...datasets.filter((d) => d.id !== dataset.id)];
      render();
      refresh();
    } catch (e) {
      progress.className = "progress status-failed";
      showError(`Could not upload ${file.name}: ${e instanceof ApiError ? formatDetail(e.detail) : e.message}`);
    } finally {
      pick.disabled = false;
    }
  }

  function showError(message) {
    error.textContent = message;
    error.hidden = false;
  }

  function preview(dataset) {
    const img = el("img", { alt: "", class: "dataset-preview", hidden: true });
    if (dataset.status === "ready" && dataset.preview_url) {
      if (!previews.has(dataset.id)) {
        previews.set(
          dataset.id,
          api(dataset.preview_url, { raw: true }).then(async (res) => URL.createObjectURL(await res.blob())),
        );
      }
      previews
        .get(dataset.id)
        .then((url) => {
          img.src = url;
          img.hidden = false;
        })
        .catch(() => previews.delete(dataset.id)); // tried again at the next refresh
    }
    return img;
  }

  function deleteButton(dataset) {
    const isArmed = armed.has(dataset.id);
    return el(
      "button",
      {
        type: "button",
        class: `small danger delete${isArmed ? " armed" : ""}`,
        onclick: () => remove(dataset),
      },
      isArmed ? "Click again to delete" : "Delete",
    );
  }

  async function remove(dataset) {
    if (!armed.has(dataset.id)) {
      armed.add(dataset.id);
      render();
      setTimeout(() => {
        if (armed.delete(dataset.id) && !stopped) render();
      }, 4000);
      return;
    }
    armed.delete(dataset.id);
    try {
      await api(`/v1/datasets/${dataset.id}`, { method: "DELETE" });
      datasets = datasets.filter((d) => d.id !== dataset.id);
      toast(`Deleted ${dataset.name || shortId(dataset.id)}.`, "ok");
    } catch (e) {
      toast(`Could not delete: ${e instanceof ApiError ? formatDetail(e.detail) : e.message}`, "error");
    }
    render();
  }

  function row(d) {
    const sizes = (d.summary?.sizes || []).slice(0, 3).map((s) => `${s.width}×${s.height}`);
    return el(
      "tr",
      { class: "dataset-row", dataset: { datasetId: d.id, status: d.status } },
      el("td", { class: "col-preview" }, preview(d)),
      el(
        "td",
        {},
        el("div", { class: "dataset-name" }, d.name || `data set ${shortId(d.id)}`),
        el("div", { class: "muted mono small" }, shortId(d.id), d.source && d.source !== "upload" ? ` · ${d.source}` : ""),
        sizes.length ? el("div", { class: "muted small" }, sizes.join(", ")) : null,
        d.error ? el("div", { class: "error small dataset-error" }, d.error) : null,
      ),
      el("td", {}, datasetBadge(d)),
      el("td", { class: "num images" }, fmtNumber(d.image_count)),
      el("td", { class: "num skipped", title: skippedReasons(d) }, fmtNumber(d.skipped)),
      el("td", { class: "num size" }, fmtBytes(d.status === "uploading" ? d.received_bytes : d.size_bytes)),
      el("td", {}, fmtTime(d.created_at)),
      el("td", { class: "num" }, deleteButton(d)),
    );
  }

  function render() {
    if (!datasets.length) {
      tbody.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "empty" }, "No data sets yet: upload an archive of images.")));
    } else {
      tbody.replaceChildren(...datasets.map(row));
    }
    const ready = datasets.filter((d) => d.status === "ready").length;
    summary.textContent = datasets.length ? `${datasets.length} shown, ${ready} ready` : "";
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const page = await api("/v1/datasets?limit=200");
      if (stopped) return;
      datasets = page.items;
      render();
    } catch (e) {
      if (stopped) return;
      showError(`Could not load data sets: ${e.message}`);
    }
    if (stopped) return;
    const active = datasets.some((d) => !TERMINAL.has(d.status));
    timer = setTimeout(refresh, active ? ACTIVE_REFRESH_MS : IDLE_REFRESH_MS);
  }

  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    for (const url of previews.values()) url.then((u) => URL.revokeObjectURL(u)).catch(() => {});
  };
}

function skippedReasons(dataset) {
  const reasons = dataset.summary?.skipped_reasons || {};
  return Object.entries(reasons)
    .map(([reason, n]) => `${n} ${reason}`)
    .join(", ");
}
