// Two small charts beside the loss curve: FID by step (from the job's evaluations), and the
// newest metric point's loss by timestep (`loss_by_t`: the mean unweighted loss of the images
// whose t fell in each of 10 equal ranges of [0, T)). Chart.js comes from static/vendor.

/** FID over training steps; KID (mean ± std over the subsets) in the tooltip. */
export class FidChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.points = new Map(); // step -> evaluation
    this.canvas.dataset.points = "0";
    this.chart = new Chart(canvas, {
      type: "line",
      data: {
        datasets: [
          {
            label: "FID",
            data: [],
            parsing: false,
            borderColor: "#7c3aed",
            backgroundColor: "#7c3aed",
            borderWidth: 2,
            pointRadius: 3,
          },
        ],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: {
          x: { type: "linear", min: 0, title: { display: true, text: "step" }, ticks: { precision: 0 } },
          y: { type: "linear", title: { display: true, text: "FID (lower is better)" } },
        },
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              title: (items) => (items.length ? `step ${items[0].parsed.x}` : ""),
              label: (item) => {
                const e = item.raw.evaluation;
                return [
                  `FID ${e.fid.toFixed(2)}`,
                  `KID ${e.kid.toFixed(4)} ± ${e.kid_std.toFixed(4)}`,
                  `${e.samples} samples, ${e.feature_network}`,
                ];
              },
            },
          },
        },
      },
    });
  }

  get size() {
    return this.points.size;
  }

  get lastStep() {
    return this.points.size ? Math.max(...this.points.keys()) : -1;
  }

  get latest() {
    return this.points.size ? this.points.get(this.lastStep) : null;
  }

  /** The evaluation with the lowest FID (the earliest on a tie), as the server picks `best`. */
  get best() {
    let best = null;
    for (const e of this.sorted()) if (best === null || e.fid < best.fid) best = e;
    return best;
  }

  /** Add evaluations ({step, fid, kid, ...}); a step seen before is replaced. */
  add(evaluations) {
    if (!evaluations.length) return;
    for (const e of evaluations) this.points.set(e.step, e);
    const sorted = this.sorted();
    this.chart.data.datasets[0].data = sorted.map((e) => ({ x: e.step, y: e.fid, evaluation: e }));
    this.chart.update("none");
    this.canvas.dataset.points = String(sorted.length);
    this.canvas.dataset.lastStep = String(this.lastStep);
    this.canvas.dataset.latestFid = String(this.latest.fid);
  }

  sorted() {
    return [...this.points.values()].sort((a, b) => a.step - b.step);
  }

  destroy() {
    this.chart.destroy();
  }
}

/** Bars of the loss per timestep range; a range no image fell in is a gap (no bar). */
export class LossByTChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.step = -1;
    this.canvas.dataset.step = "-1";
    this.chart = new Chart(canvas, {
      type: "bar",
      data: {
        labels: [],
        datasets: [{ label: "loss", data: [], backgroundColor: "rgba(13, 148, 136, 0.75)", borderWidth: 0 }],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: {
          x: { title: { display: true, text: "timestep t" } },
          y: { type: "linear", beginAtZero: true, title: { display: true, text: "loss (unweighted)" } },
        },
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              title: (items) => (items.length ? `t in ${items[0].label}` : ""),
              label: (item) => `loss ${item.parsed.y?.toPrecision(4) ?? "–"}`,
            },
          },
        },
      },
    });
  }

  /**
   * Show a metric point's `loss_by_t` (an older point than the one shown is ignored: a replay).
   * `timesteps` is the job's T, for the axis labels. Returns whether the chart changed.
   */
  show(step, lossByT, timesteps) {
    if (!Array.isArray(lossByT) || !lossByT.length || step < this.step) return false;
    this.step = step;
    const values = lossByT.map((v) => (typeof v === "number" && Number.isFinite(v) ? v : null));
    this.chart.data.labels = bucketLabels(values.length, timesteps);
    this.chart.data.datasets[0].data = values;
    this.chart.update("none");
    this.canvas.dataset.step = String(step);
    this.canvas.dataset.bars = String(values.filter((v) => v !== null).length);
    return true;
  }

  destroy() {
    this.chart.destroy();
  }
}

/** "0–99", "100–199", …: bucket i holds the t with floor(t * n / T) === i. */
export function bucketLabels(n, timesteps) {
  if (!timesteps) return Array.from({ length: n }, (_, i) => `${i + 1}/${n}`);
  const first = (i) => Math.ceil((i * timesteps) / n);
  return Array.from({ length: n }, (_, i) => {
    const [lo, hi] = [first(i), first(i + 1) - 1];
    return lo < hi ? `${lo}–${hi}` : lo === hi ? String(lo) : "none"; // T < n leaves some empty
  });
}
