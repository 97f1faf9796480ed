// One job: status and progress (images/s, MFU and peak GPU memory of the latest metric point),
// its training events, the live loss chart, FID by step and loss by timestep, sample grids,
// checkpoints (the best by FID too), cancel. Live updates come from GET /v1/jobs/{id}/events
// (SSE over fetch); where that route does not exist the page polls the job, its metrics,
// evaluations, training events, checkpoints and samples every 2 s instead.

import { api, ApiError, downloadName, readBlob, saveBlob, sha256Hex } from "../api.js";
import { LossChart } from "../loss-chart.js";
import { FidChart, LossByTChart } from "../quality-charts.js";
import { followEvents } from "../sse.js";
import {
  card,
  el,
  elapsed,
  etaSeconds,
  fmtBytes,
  fmtDuration,
  fmtLoss,
  fmtNumber,
  fmtTime,
  jobTitle,
  progressBar,
  sleep,
  statusBadge,
  TERMINAL,
  toast,
} from "../util.js";

const POLL_MS = 2000;
const EVENTS_SHOWN = 5; // the newest training events listed under the stats (`ddpm events` has all)
const LOG_SCALE = "ddpm-jobs.log-scale";

export function jobView(root, jobId) {
  const base = `/v1/jobs/${jobId}`;
  const stop = new AbortController();
  let job = null;
  let latest = { lr: null, images_per_s: null, mfu: null, peak_memory_bytes: null };
  let stream = null;
  let samplesSupported = true;
  const samples = new Map(); // step -> {step, url}
  const imageUrls = new Map(); // api url -> Promise of a blob: URL
  let newestCheckpoint = -1;
  let checkpointsFetchedAt = 0;
  let selectedSample = null; // null: follow the newest grid
  let checkpointList = [];
  let evaluationsSupported = true;
  let trainingEventsSupported = true;
  const trainingEvents = new Map(); // id -> a training event (from the list or the stream)

  // ----- layout -----
  const title = el("h1", { id: "job-title" }, "Loading…");
  const badge = el("span");
  const cancelButton = el("button", { type: "button", id: "cancel-job", class: "danger", hidden: true });
  // A finished job: train it on to more steps (POST …/continue), or delete it (DELETE, confirmed).
  const continueSteps = el("input", {
    type: "number",
    id: "continue-steps",
    min: "1",
    step: "1",
    "aria-label": "Total steps to continue to",
  });
  const continueButton = el("button", { type: "button", id: "continue-job", class: "secondary" }, "Continue");
  const continueForm = el("span", { class: "continue-job", hidden: true }, continueSteps, continueButton);
  const deleteButton = el("button", { type: "button", id: "delete-job", class: "danger", hidden: true }, "Delete job");
  const header = card({ class: "job-head" }, [
    el("a", { href: "#/", class: "back", "aria-label": "All jobs" }, "←"),
    title,
    badge,
    el("div", { class: "spacer" }),
    cancelButton,
    continueForm,
    deleteButton,
  ]);
  const progress = el("div", { class: "job-progress" });
  const stats = el("dl", { class: "stats", id: "job-stats" });
  const errorBox = el("pre", { class: "error", id: "job-error", hidden: true });
  const waitingBox = el("p", { class: "waiting", id: "job-waiting", hidden: true });
  const eventList = el("ul", { class: "training-events", id: "job-events", hidden: true });
  header.append(progress, stats, eventList, waitingBox, errorBox);

  const liveState = el("span", { class: "live", id: "live-state" }, "connecting");
  const logToggle = el("input", { type: "checkbox", id: "log-scale" });
  logToggle.checked = localStorage.getItem(LOG_SCALE) === "1";
  const canvas = el("canvas", { id: "loss-chart", "aria-label": "Loss by step" });
  const chartCard = card(
    {},
    [
      el("h2", {}, "Loss"),
      liveState,
      el("div", { class: "spacer" }),
      el("label", { class: "toggle", for: "log-scale" }, logToggle, "log scale"),
      el("button", { type: "button", class: "secondary small", id: "loss-png", onclick: () => saveLossPng() }, "loss.png"),
    ],
    el("div", { class: "chart-box" }, canvas),
  );

  // FID by step: shown once the job has an evaluation; until then, why there is none.
  const fidCanvas = el("canvas", { id: "fid-chart", "aria-label": "FID by step" });
  const fidBox = el("div", { class: "chart-box short", hidden: true }, fidCanvas);
  const fidLatest = el("span", { class: "muted small", id: "fid-latest" });
  const fidEmpty = el("p", { class: "muted", id: "fid-empty" }, "No evaluations yet.");
  const fidCard = card(
    { id: "fid-card" },
    [el("h2", {}, "FID"), el("div", { class: "spacer" }), fidLatest],
    fidEmpty,
    fidBox,
  );
  const byTCanvas = el("canvas", { id: "loss-by-t-chart", "aria-label": "Loss by timestep" });
  const byTBox = el("div", { class: "chart-box short", hidden: true }, byTCanvas);
  const byTCaption = el("span", { class: "muted small", id: "loss-by-t-step" });
  const byTEmpty = el("p", { class: "muted", id: "loss-by-t-empty" }, "No loss by timestep yet.");
  const byTCard = card(
    { id: "loss-by-t-card" },
    [el("h2", {}, "Loss by timestep"), el("div", { class: "spacer" }), byTCaption],
    byTEmpty,
    byTBox,
  );

  const latestImg = el("img", { id: "latest-sample", alt: "", hidden: true });
  const latestCaption = el("figcaption", { class: "muted" });
  const sampleStrip = el("div", { class: "sample-strip", id: "sample-series" });
  const samplesEmpty = el("p", { class: "muted", id: "samples-empty" }, "No sample grids yet.");
  const samplesCard = card(
    {},
    [el("h2", {}, "Samples")],
    samplesEmpty,
    el("figure", { class: "latest-sample" }, latestImg, latestCaption),
    sampleStrip,
  );

  const ckptBody = el("tbody");
  const bestButton = el(
    "button",
    {
      type: "button",
      class: "secondary small",
      id: "download-best",
      hidden: true,
      onclick: (e) => downloadBest(e.currentTarget),
    },
    "Download best",
  );
  const ckptCard = card(
    {},
    [el("h2", {}, "Checkpoints"), el("div", { class: "spacer" }), bestButton],
    el(
      "table",
      { class: "checkpoints", id: "checkpoint-table" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", { class: "num" }, "Step"),
          el("th", { class: "num" }, "Size"),
          el("th", {}, "SHA-256"),
          el("th", {}, "Saved"),
          el("th", {}),
        ),
      ),
      ckptBody,
    ),
  );
  const ckptHead = ckptCard.querySelector("thead");

  const specPre = el("pre", { class: "code", id: "job-spec" });
  const specCard = el(
    "details",
    { class: "card" },
    el("summary", {}, el("h2", {}, "Spec")),
    specPre,
  );

  root.replaceChildren(
    header,
    el("div", { class: "job-grid" }, el(
      "div",
      { class: "col-main" },
      chartCard,
      el("div", { class: "chart-pair" }, fidCard, byTCard),
      ckptCard,
      specCard,
    ), samplesCard),
  );
  const chart = new LossChart(canvas);
  const fidChart = new FidChart(fidCanvas);
  const byTChart = new LossByTChart(byTCanvas);
  chart.setLogScale(logToggle.checked);
  logToggle.addEventListener("change", () => {
    localStorage.setItem(LOG_SCALE, logToggle.checked ? "1" : "0");
    chart.setLogScale(logToggle.checked);
  });

  // ----- rendering -----
  function renderJob() {
    document.title = `${jobTitle(job)} · ddpm-jobs`;
    title.textContent = jobTitle(job);
    badge.replaceChildren(statusBadge(job));
    const pct = job.total_steps ? Math.floor((100 * job.step) / job.total_steps) : 0;
    progress.replaceChildren(
      progressBar(job),
      el(
        "div",
        { class: "progress-label" },
        el("span", { id: "job-step" }, `step ${fmtNumber(job.step)} of ${fmtNumber(job.total_steps)}`),
        el("span", {}, `${pct}%`),
      ),
    );
    const secs = elapsed(job);
    const rate = latest.images_per_s;
    const eta = job.status === "running" ? etaSeconds(job, rate) : null;
    const items = [
      ["Loss", fmtLoss(job.loss)],
      fidChart.latest ? ["FID", fidChart.latest.fid.toFixed(2)] : null,
      ["Learning rate", latest.lr === null ? "–" : latest.lr.toExponential(2)],
      ["Images/s", rate === null ? "–" : fmtNumber(rate, 1)],
      latest.mfu !== null ? ["MFU", `${(latest.mfu * 100).toFixed(1)}%`] : null,
      latest.peak_memory_bytes !== null ? ["Peak GPU memory", fmtBytes(latest.peak_memory_bytes)] : null,
      ["Elapsed", fmtDuration(secs)],
      eta !== null ? ["ETA", fmtDuration(eta)] : null,
      job.gpu_seconds ? ["GPU time", fmtDuration(job.gpu_seconds)] : null,
      ["Attempt", String(job.attempt)],
      ["GPUs", String(job.spec?.resources?.gpus ?? 1)],
      ["Created", fmtTime(job.created_at)],
      ["Finished", fmtTime(job.finished_at)],
      ["Job id", job.id],
    ].filter(Boolean);
    stats.replaceChildren(...items.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
    errorBox.hidden = !job.error;
    errorBox.textContent = job.error || "";
    // GET /v1/jobs/{id} and every status event say why a queued job waits.
    if (job.status !== "queued") waitingBox.hidden = true;
    else if (job.waiting_reason) {
      waitingBox.hidden = false;
      waitingBox.textContent = `Waiting: ${job.waiting_reason}`;
    }
    const cancellable = !TERMINAL.has(job.status);
    cancelButton.hidden = !cancellable;
    if (cancellable && job.cancel_requested) {
      cancelButton.disabled = true;
      cancelButton.textContent = "Cancelling…";
    } else if (cancellable && cancelButton.dataset.armed !== "1") {
      cancelButton.disabled = false;
      cancelButton.textContent = "Cancel job";
    }
    const finished = TERMINAL.has(job.status);
    deleteButton.hidden = !finished;
    if (finished && continueForm.hidden) {
      continueSteps.min = String(job.step + 1);
      continueSteps.value = String(Math.max(job.step + 1, job.total_steps * 2));
    }
    continueForm.hidden = !finished;
    specPre.textContent = JSON.stringify(job.spec, null, 2);
    if (!fidChart.size) renderEvaluations();
  }

  // The newest few training events, newest first: an OOM step redone smaller, a failed compile.
  function renderTrainingEvents() {
    const all = [...trainingEvents.values()].sort((a, b) => a.id - b.id);
    eventList.hidden = all.length === 0;
    const shown = all.slice(-EVENTS_SHOWN).reverse();
    const items = shown.map((e) =>
      el(
        "li",
        { "data-kind": e.kind, title: `attempt ${e.attempt}` },
        el("span", { class: "muted" }, `step ${fmtNumber(e.step)} · ${e.kind}`),
        " ",
        e.message,
      ),
    );
    const earlier = all.length - shown.length;
    if (earlier > 0) items.push(el("li", { class: "muted" }, `and ${earlier} earlier (ddpm events ${jobId})`));
    eventList.replaceChildren(...items);
  }

  function renderEvaluations() {
    const latestEval = fidChart.latest;
    revealChart(fidBox, fidChart, Boolean(latestEval));
    fidEmpty.hidden = Boolean(latestEval);
    if (!latestEval) {
      const every = job?.spec?.evaluation?.every;
      fidEmpty.replaceChildren(
        ...(!evaluationsSupported
          ? ["This server does not measure FID."]
          : every
            ? [`No evaluations yet: the first comes at step ${fmtNumber(every)}.`]
            : [
                "FID is not measured for this job. Set ",
                el("code", {}, "evaluation.every"),
                " in the spec (say 1000) to evaluate every that many steps.",
              ]),
      );
      return;
    }
    const kid = `KID ${latestEval.kid.toFixed(4)} ± ${latestEval.kid_std.toFixed(4)}`;
    fidLatest.textContent = `${latestEval.fid.toFixed(2)} at step ${fmtNumber(latestEval.step)} · ${kid}`;
    renderBest();
  }

  // The best checkpoint (lowest FID, as the server picks it) once evaluations exist.
  function renderBest() {
    const best = fidChart.best;
    bestButton.hidden = !best;
    if (!best) return;
    bestButton.title = `The checkpoint with the lowest FID (${best.fid.toFixed(2)} at step ${best.step})`;
    const bestStep = bestCheckpointStep();
    for (const row of ckptBody.querySelectorAll(".checkpoint-row")) {
      row.classList.toggle("best", Number(row.dataset.step) === bestStep);
    }
  }

  function bestCheckpointStep() {
    const kept = new Set(checkpointList.map((c) => c.step));
    let best = null;
    for (const e of fidChart.sorted()) if (kept.has(e.step) && (best === null || e.fid < best.fid)) best = e;
    return best ? best.step : null;
  }

  // Chart.js sizes a canvas from its box, which is 0x0 while hidden, and otherwise notices the box
  // appear only on its next resize observation: resize at once, so a shown chart is drawn.
  function revealChart(box, chart, shown) {
    const appearing = shown && box.hidden;
    box.hidden = !shown;
    if (appearing) chart.chart.resize();
  }

  function showLossByT(step, lossByT) {
    if (!byTChart.show(step, lossByT, job?.spec?.diffusion?.timesteps)) return;
    revealChart(byTBox, byTChart, true);
    byTEmpty.hidden = true;
    byTCaption.textContent = `step ${fmtNumber(step)}`;
  }

  function renderCheckpoints(list) {
    checkpointList = list;
    newestCheckpoint = list.length ? Math.max(...list.map((c) => c.step)) : -1;
    ckptHead.hidden = !list.length;
    if (!list.length) {
      ckptBody.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "empty" }, "No checkpoints yet.")));
      return;
    }
    ckptBody.replaceChildren(
      ...[...list].reverse().map((c) =>
        el(
          "tr",
          { class: "checkpoint-row", dataset: { step: c.step } },
          el("td", { class: "num mono" }, fmtNumber(c.step)),
          el("td", { class: "num" }, fmtBytes(c.size_bytes)),
          el("td", { class: "mono sha", title: c.sha256 }, el("span", { class: "sha256" }, c.sha256)),
          el("td", { class: "nowrap" }, fmtTime(c.created_at)),
          el(
            "td",
            { class: "num nowrap" },
            el("span", { class: "best-tag", title: "The lowest FID of the checkpoints kept" }, "best"),
            el(
              "button",
              {
                type: "button",
                class: "secondary small download",
                dataset: { step: c.step, sha256: c.sha256 },
                onclick: (e) => downloadCheckpoint(c, e.currentTarget),
              },
              "Download",
            ),
          ),
        ),
      ),
    );
    renderBest();
  }

  // <img> cannot send the key: fetch the PNG with it and show it through a blob: URL.
  async function showImage(img, url) {
    if (!imageUrls.has(url)) {
      const load = api(url, { raw: true, signal: stop.signal }).then(async (res) => URL.createObjectURL(await res.blob()));
      imageUrls.set(url, load);
      load.catch(() => imageUrls.delete(url)); // try again next time
    }
    img.src = await imageUrls.get(url);
    img.hidden = false;
  }

  function renderSamples() {
    const list = [...samples.values()].sort((a, b) => a.step - b.step);
    samplesEmpty.hidden = list.length > 0;
    if (!list.length) return;
    const current = (selectedSample !== null && samples.get(selectedSample)) || list[list.length - 1];
    const isNewest = current === list[list.length - 1];
    latestCaption.textContent = `step ${fmtNumber(current.step)}${isNewest ? " · newest" : ""}`;
    latestImg.alt = `Sample grid at step ${current.step}`;
    latestImg.dataset.step = current.step;
    showImage(latestImg, current.url).catch((e) => reportError("sample grid", e));
    const known = new Set([...sampleStrip.children].map((n) => Number(n.dataset.step)));
    for (const s of list) {
      if (known.has(s.step)) continue;
      const thumb = el("img", { alt: `step ${s.step}` });
      const button = el(
        "button",
        {
          type: "button",
          class: "thumb",
          dataset: { step: s.step },
          title: `step ${s.step}`,
          onclick: () => {
            selectedSample = s === list[list.length - 1] ? null : s.step;
            renderSamples();
          },
        },
        thumb,
        el("span", {}, fmtNumber(s.step)),
      );
      const after = [...sampleStrip.children].find((n) => Number(n.dataset.step) > s.step);
      sampleStrip.insertBefore(button, after || null);
      showImage(thumb, s.url).catch((e) => reportError("sample grid", e));
    }
    for (const n of sampleStrip.children) n.classList.toggle("selected", Number(n.dataset.step) === current.step);
  }

  function reportError(what, e) {
    if (stop.signal.aborted || e.name === "AbortError") return;
    toast(`Could not load ${what}: ${e.message}`, "error");
  }

  // ----- data -----
  async function loadMetrics() {
    let after = chart.lastStep;
    for (;;) {
      const page = await api(`${base}/metrics?after_step=${after}&limit=10000`, { signal: stop.signal });
      chart.add(page.items);
      if (page.items.length) {
        const last = page.items[page.items.length - 1];
        noteLatest(last);
        const measured = page.items.findLast((p) => p.loss_by_t?.length);
        if (measured) showLossByT(measured.step, measured.loss_by_t);
      }
      if (page.next_after_step === null || page.next_after_step === undefined) return;
      after = page.next_after_step;
    }
  }

  function noteLatest(point) {
    latest = {
      lr: point.lr ?? latest.lr,
      images_per_s: point.images_per_s ?? latest.images_per_s,
      mfu: point.mfu ?? latest.mfu,
      peak_memory_bytes: point.peak_memory_bytes ?? latest.peak_memory_bytes,
    };
  }

  async function loadTrainingEvents() {
    if (!trainingEventsSupported) return;
    for (;;) {
      const after = Math.max(0, ...trainingEvents.keys());
      let page;
      try {
        page = await api(`${base}/training-events?after_id=${after}&limit=1000`, { signal: stop.signal });
      } catch (e) {
        if (e instanceof ApiError && e.status === 404 && e.message === "Not Found") {
          trainingEventsSupported = false; // FastAPI's own 404: the route does not exist
          return;
        }
        throw e;
      }
      for (const event of page.items) trainingEvents.set(event.id, event);
      renderTrainingEvents();
      if (page.next_after_id === null || page.next_after_id === undefined) return;
    }
  }

  async function loadEvaluations() {
    if (!evaluationsSupported) return;
    const limit = 1000;
    for (;;) {
      let page;
      try {
        page = await api(`${base}/evaluations?after_step=${fidChart.lastStep}&limit=${limit}`, { signal: stop.signal });
      } catch (e) {
        if (e instanceof ApiError && e.status === 404 && e.message === "Not Found") {
          evaluationsSupported = false; // FastAPI's own 404: the route does not exist
          renderEvaluations();
          return;
        }
        throw e;
      }
      fidChart.add(page);
      renderEvaluations();
      if (page.length < limit) return;
    }
  }

  async function loadCheckpoints() {
    checkpointsFetchedAt = Date.now();
    renderCheckpoints(await api(`${base}/checkpoints`, { signal: stop.signal }));
  }

  // Checkpoints are saved in the background, so a row can commit after later events have
  // gone out: when training has passed a checkpoint step the list does not show yet, look again.
  function checkpointDue(step) {
    const every = job?.spec?.training?.checkpoint_every;
    if (!every) return false;
    const due = Math.floor(step / every) * every;
    return due > 0 && due > newestCheckpoint && Date.now() - checkpointsFetchedAt > 5000;
  }

  async function loadSamples() {
    if (!samplesSupported) return;
    try {
      const list = await api(`${base}/samples`, { signal: stop.signal });
      for (const s of list) samples.set(s.step, s);
      renderSamples();
    } catch (e) {
      if (e instanceof ApiError && e.status === 404 && job) {
        samplesSupported = false; // the job exists, so the route does not
        samplesEmpty.textContent = "This server does not serve sample grids.";
        return;
      }
      throw e;
    }
  }

  function onEvent(event) {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    if (event.type === "status") {
      job = data;
      renderJob();
    } else if (event.type === "metric") {
      chart.add([data]);
      showLossByT(data.step, data.loss_by_t);
      noteLatest(data);
      if (job && data.step > job.step) job = { ...job, step: data.step, loss: data.loss };
      if (job) renderJob();
      if (checkpointDue(data.step)) loadCheckpoints().catch((e) => reportError("checkpoints", e));
    } else if (event.type === "checkpoint") {
      loadCheckpoints().catch((e) => reportError("checkpoints", e));
    } else if (event.type === "sample") {
      samples.set(data.step, data);
      renderSamples();
    } else if (event.type === "training_event") {
      trainingEvents.set(data.id, data);
      renderTrainingEvents();
    } else if (event.type === "evaluation") {
      fidChart.add([data]);
      renderEvaluations();
      if (job) renderJob();
    }
  }

  function setLive(state) {
    const labels = {
      connecting: "connecting…",
      live: "live",
      reconnecting: "reconnecting…",
      ended: "final",
      unsupported: "polling",
      polling: "polling",
      error: "offline",
    };
    liveState.textContent = labels[state] || state;
    liveState.dataset.state = state;
  }

  async function poll() {
    setLive("polling");
    while (!stop.signal.aborted) {
      try {
        job = await api(base, { signal: stop.signal });
        await loadMetrics();
        await loadEvaluations();
        await loadTrainingEvents();
        renderJob();
        await Promise.all([loadCheckpoints(), loadSamples()]);
        if (TERMINAL.has(job.status)) {
          setLive("ended");
          return;
        }
      } catch (e) {
        reportError("the job", e);
      }
      await sleep(POLL_MS, stop.signal);
    }
  }

  async function start() {
    try {
      job = await api(base, { signal: stop.signal });
    } catch (e) {
      if (stop.signal.aborted) return;
      title.textContent = e instanceof ApiError && e.status === 404 ? "No such job" : "Could not load the job";
      errorBox.textContent = e.message;
      errorBox.hidden = false;
      setLive("error");
      return;
    }
    renderJob();
    await Promise.all([
      // Evaluations and training events after metrics: the stream starts after the newest
      // metric point read, and both are sent after their step's metric point, so none falls
      // between the two (a training event both read and streamed is kept once, by its id).
      loadMetrics()
        .catch((e) => reportError("metrics", e))
        .then(() =>
          Promise.all([
            loadEvaluations().catch((e) => reportError("evaluations", e)),
            loadTrainingEvents().catch((e) => reportError("training events", e)),
          ]),
        ),
      loadCheckpoints().catch((e) => reportError("checkpoints", e)),
      loadSamples().catch((e) => reportError("samples", e)),
    ]);
    if (stop.signal.aborted) return;
    renderJob();
    stream = followEvents(`${base}/events`, {
      onEvent,
      onState: (state) => {
        setLive(state);
        if (state === "ended") {
          // The stream ended with the terminal status: take the final lists once more.
          loadCheckpoints().catch((e) => reportError("checkpoints", e));
          loadSamples().catch((e) => reportError("samples", e));
        }
      },
      onUnsupported: () => poll(),
      isDone: () => job && TERMINAL.has(job.status),
      // The history is loaded: start the stream after the newest metric point read.
      lastEventId: chart.lastStep >= 0 ? `${chart.lastStep}.0` : "",
    });
  }

  // ----- actions -----
  cancelButton.addEventListener("click", async () => {
    // Two clicks: the first arms the button for a few seconds, the second sends the request.
    if (cancelButton.dataset.armed !== "1") {
      cancelButton.dataset.armed = "1";
      cancelButton.textContent = "Click again to cancel";
      cancelButton.classList.add("armed");
      setTimeout(() => {
        if (cancelButton.dataset.armed === "1" && !cancelButton.disabled) {
          cancelButton.dataset.armed = "";
          cancelButton.classList.remove("armed");
          cancelButton.textContent = "Cancel job";
        }
      }, 4000);
      return;
    }
    cancelButton.dataset.armed = "";
    cancelButton.classList.remove("armed");
    cancelButton.disabled = true;
    cancelButton.textContent = "Cancelling…";
    try {
      job = await api(`${base}/cancel`, { method: "POST" });
      renderJob();
    } catch (e) {
      toast(`Cancel failed: ${e.message}`, "error");
      cancelButton.disabled = false;
      cancelButton.textContent = "Cancel job";
    }
  });

  continueButton.addEventListener("click", async () => {
    const steps = Number(continueSteps.value);
    if (!Number.isInteger(steps) || steps <= job.step) {
      toast(`Continue to more than the ${job.step} steps it has done`, "error");
      return;
    }
    continueButton.disabled = true;
    try {
      await api(`${base}/continue`, { method: "POST", body: { steps } });
      toast(`Continuing to ${steps} steps`);
      window.dispatchEvent(new HashChangeEvent("hashchange")); // this page again, following it live
    } catch (e) {
      toast(`Continue failed: ${e.message}`, "error");
    } finally {
      continueButton.disabled = false;
    }
  });

  deleteButton.addEventListener("click", async () => {
    const what = job.name ? `"${job.name}"` : jobId;
    if (!window.confirm(`Delete job ${what} with its checkpoints, samples and metrics? This cannot be undone.`)) {
      return;
    }
    deleteButton.disabled = true;
    try {
      await api(base, { method: "DELETE" });
      toast("Job deleted");
      location.hash = "#/";
    } catch (e) {
      toast(`Delete failed: ${e.message}`, "error");
      deleteButton.disabled = false;
    }
  });

  function downloadCheckpoint(c, button) {
    const name = `${jobId}-step-${String(c.step).padStart(8, "0")}.safetensors`;
    return download(`${base}/checkpoints/${c.step}`, button, () => c, name, `Checkpoint ${c.step}`);
  }

  // The server picks the best checkpoint and names its step in the file name: check the bytes
  // against that step's row in the list (else against the sha256 the server sends with them).
  function downloadBest(button) {
    const listed = (res) => {
      const step = Number(downloadName(res, "").match(/-step-(\d+)\./)?.[1]);
      const header = (res.headers.get("X-Checksum-SHA256") || res.headers.get("ETag") || "").replaceAll('"', "");
      return checkpointList.find((c) => c.step === step) || { step, sha256: header || null };
    };
    return download(`${base}/checkpoints/best`, button, listed, `${jobId}-best.safetensors`, "Best checkpoint");
  }

  async function download(path, button, expected, fallbackName, what) {
    const label = button.textContent;
    button.disabled = true;
    try {
      const res = await api(path, { raw: true, headers: { Accept: "application/octet-stream" } });
      const c = expected(res);
      const blob = await readBlob(res, (fraction) => {
        button.textContent = fraction === null ? "Downloading…" : `${Math.floor(fraction * 100)}%`;
      });
      button.textContent = "Verifying…";
      const digest = c.sha256 ? await sha256Hex(blob) : null;
      if (digest !== null && digest !== c.sha256) {
        throw new Error(`sha256 mismatch: got ${digest}, expected ${c.sha256}`);
      }
      saveBlob(blob, downloadName(res, fallbackName));
      toast(digest ? `${what} downloaded, sha256 verified` : `${what} downloaded`, "ok");
    } catch (e) {
      toast(`Download failed: ${e.message}`, "error");
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  }

  async function saveLossPng() {
    try {
      const res = await api(`${base}/loss.png`, { raw: true, headers: { Accept: "image/png" } });
      saveBlob(await res.blob(), `${jobId}-loss.png`);
    } catch (e) {
      toast(
        e instanceof ApiError && e.status === 404 ? "This server has no loss.png yet" : `loss.png: ${e.message}`,
        "error",
      );
    }
  }

  // The elapsed time and ETA tick while the job runs, between events.
  const ticker = setInterval(() => {
    if (job && job.status === "running") renderJob();
  }, 1000);

  start();
  return () => {
    stop.abort();
    stream?.close();
    clearInterval(ticker);
    chart.destroy();
    fidChart.destroy();
    byTChart.destroy();
    for (const load of imageUrls.values()) load.then((url) => URL.revokeObjectURL(url)).catch(() => {});
  };
}
