// Small DOM and formatting helpers. Text always goes in as text (never innerHTML): job names,
// errors and specs come from users.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function shortId(id) {
  return String(id).slice(0, 8);
}

export function jobTitle(job) {
  return job.name || `job ${shortId(job.id)}`;
}

export function fmtLoss(loss) {
  if (loss === null || loss === undefined) return "–";
  if (typeof loss !== "number") return String(loss); // "nan" / "inf" as the API writes them
  return loss >= 0.01 ? loss.toFixed(4) : loss.toPrecision(3);
}

export function fmtNumber(n, digits = 0) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits });
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

// A card: its head row (a title, then controls; "spacer" pushes the rest right) above the body.
export function card(attrs, head, ...body) {
  return el("section", { ...attrs, class: ["card", attrs.class].filter(Boolean).join(" ") }, el("div", { class: "card-head" }, ...head), ...body);
}

export function elapsed(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return (end - new Date(job.started_at)) / 1000;
}

// A running job's remaining seconds at its measured rate: the latest metric point's images/s over
// its batch size (as the API's eta_seconds, which is used until a point arrives here); else null.
export function etaSeconds(job, imagesPerSec) {
  const batch = job.spec?.training?.batch_size;
  const left = Math.max(job.total_steps - job.step, 0);
  if (imagesPerSec && batch) return left / (imagesPerSec / batch);
  return job.eta_seconds ?? null;
}

export function progressFraction(job) {
  if (!job.total_steps) return 0;
  if (job.status === "succeeded") return 1;
  return Math.min(1, job.step / job.total_steps);
}

export function statusBadge(job) {
  const label = job.status === "running" && job.cancel_requested ? "cancelling" : job.status;
  return el("span", { class: `badge status-${job.status}`, dataset: { status: job.status } }, label);
}

export function progressBar(job) {
  const fraction = progressFraction(job);
  const bar = el("div", { class: "bar" });
  bar.style.width = `${(fraction * 100).toFixed(1)}%`;
  return el(
    "div",
    {
      class: `progress status-${job.status}`,
      role: "progressbar",
      "aria-valuemin": 0,
      "aria-valuemax": job.total_steps,
      "aria-valuenow": job.step,
    },
    bar,
  );
}

let toastTimer = null;

export function toast(message, kind = "info") {
  const node = document.getElementById("toast");
  node.textContent = message;
  node.className = `toast-${kind}`;
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    node.hidden = true;
  }, 6000);
}
