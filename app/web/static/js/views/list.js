// The job list: newest first, status filter, progress, refreshed every few seconds.

import { api } from "../api.js";
import { card, el, elapsed, fmtDuration, fmtLoss, fmtNumber, fmtTime,
  jobTitle, progressBar, shortId, statusBadge, TERMINAL } from "../util.js";

const PAGE = 50;
const REFRESH_MS = 3000;
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];

export function listView(root) {
  let jobs = [];
  let nextCursor = null;
  let status = sessionStorage.getItem("ddpm-jobs.filter") || "";
  let timer = null;
  let stopped = false;

  const filter = el(
    "select",
    { id: "status-filter", "aria-label": "Filter by status" },
    el("option", { value: "" }, "all statuses"),
    STATUSES.map((s) => el("option", { value: s }, s)),
  );
  filter.value = status;
  filter.addEventListener("change", () => {
    status = filter.value;
    sessionStorage.setItem("ddpm-jobs.filter", status);
    jobs = [];
    refresh();
  });
  const tbody = el("tbody");
  const more = el("button", { type: "button", class: "secondary", hidden: true, onclick: () => loadMore() }, "Load more");
  const summary = el("span", { class: "muted" });
  const error = el("p", { class: "error", hidden: true });

  root.replaceChildren(
    card(
      {},
      [el("h1", {}, "Jobs"), summary, el("div", { class: "spacer" }), filter, el("a", { class: "button", href: "#/new" }, "New job")],
      error,
      el(
        "table",
        { class: "jobs", id: "job-table" },
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            el("th", {}, "Job"),
            el("th", {}, "Status"),
            el("th", { class: "col-progress" }, "Progress"),
            el("th", { class: "num" }, "Loss"),
            el("th", {}, "Created"),
            el("th", { class: "num" }, "Time"),
          ),
        ),
        tbody,
      ),
      el("div", { class: "card-foot" }, more),
    ),
  );

  function row(job) {
    const open = () => {
      location.hash = `#/jobs/${job.id}`;
    };
    return el(
      "tr",
      { class: "job-row", dataset: { jobId: job.id, status: job.status }, onclick: open },
      el(
        "td",
        {},
        el("a", { href: `#/jobs/${job.id}`, class: "job-name" }, jobTitle(job)),
        el("div", { class: "muted mono small" }, shortId(job.id)),
      ),
      el("td", {}, statusBadge(job)),
      el(
        "td",
        { class: "col-progress" },
        progressBar(job),
        el("div", { class: "small muted" }, `${fmtNumber(job.step)} / ${fmtNumber(job.total_steps)}`),
      ),
      el("td", { class: "num" }, fmtLoss(job.loss)),
      el("td", {}, fmtTime(job.created_at)),
      el("td", { class: "num" }, fmtDuration(elapsed(job))),
    );
  }

  function render() {
    if (!jobs.length) {
      tbody.replaceChildren(
        el(
          "tr",
          {},
          el(
            "td",
            { colspan: 6, class: "empty" },
            status ? `No ${status} jobs.` : "No jobs yet. ",
            status ? null : el("a", { href: "#/new" }, "Submit one."),
          ),
        ),
      );
    } else {
      tbody.replaceChildren(...jobs.map(row));
    }
    const active = jobs.filter((j) => !TERMINAL.has(j.status)).length;
    summary.textContent = jobs.length ? `${jobs.length} shown${active ? `, ${active} active` : ""}` : "";
    more.hidden = !nextCursor;
  }

  function query(limit, cursor) {
    const params = new URLSearchParams({ limit: String(limit) });
    if (status) params.set("status", status);
    if (cursor) params.set("cursor", cursor);
    return api(`/v1/jobs?${params}`);
  }

  let generation = 0;

  async function refresh() {
    clearTimeout(timer);
    const mine = ++generation; // a filter change supersedes a refresh in flight
    try {
      // Refresh everything shown so far (newest first), up to the API's page limit.
      const page = await query(Math.min(500, Math.max(PAGE, jobs.length)));
      if (stopped || mine !== generation) return;
      jobs = page.items;
      nextCursor = page.next_cursor;
      error.hidden = true;
      render();
    } catch (e) {
      if (stopped || mine !== generation) return;
      error.textContent = `Could not load jobs: ${e.message}`;
      error.hidden = false;
    }
    if (!stopped && mine === generation) timer = setTimeout(refresh, REFRESH_MS);
  }

  async function loadMore() {
    if (!nextCursor) return;
    const page = await query(PAGE, nextCursor);
    const seen = new Set(jobs.map((j) => j.id));
    jobs = jobs.concat(page.items.filter((j) => !seen.has(j.id)));
    nextCursor = page.next_cursor;
    render();
  }

  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
