// The loss curve: raw points (one per log_every steps) and an exponentially smoothed line,
// linear or log y axis. Chart.js comes from static/vendor (the global `Chart`).

const SMOOTHING = 0.8; // TensorBoard-style EMA weight, debiased for the first points

export class LossChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.steps = [];
    this.losses = [];
    this.canvas.dataset.points = "0";
    this.chart = new Chart(canvas, {
      type: "line",
      data: {
        datasets: [
          {
            label: "loss",
            data: [],
            parsing: false,
            borderColor: "rgba(37, 99, 235, 0.35)",
            backgroundColor: "rgba(37, 99, 235, 0.35)",
            borderWidth: 1,
            // Dots while there are few points (one point draws no line), a plain line after.
            pointRadius: (ctx) => (ctx.dataset.data.length <= 60 ? 2.5 : 0),
            spanGaps: false,
          },
          {
            label: "smoothed",
            data: [],
            parsing: false,
            borderColor: "#1d4ed8",
            backgroundColor: "#1d4ed8",
            borderWidth: 2,
            pointRadius: 0,
            spanGaps: true,
          },
        ],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { type: "linear", min: 0, title: { display: true, text: "step" }, ticks: { precision: 0 } },
          y: { type: "linear", title: { display: true, text: "loss" }, afterBuildTicks: thinLogTicks },
        },
        plugins: {
          legend: { position: "top", align: "end", labels: { boxWidth: 12, boxHeight: 2 } },
          decimation: { enabled: true, algorithm: "lttb", samples: 800 },
          tooltip: {
            callbacks: {
              title: (items) => (items.length ? `step ${items[0].parsed.x}` : ""),
              label: (item) => `${item.dataset.label}: ${item.parsed.y?.toPrecision(4) ?? "–"}`,
            },
          },
        },
      },
    });
  }

  get size() {
    return this.steps.length;
  }

  get lastStep() {
    return this.steps.length ? this.steps[this.steps.length - 1] : -1;
  }

  /** Add metric points ({step, loss}); a step seen before is replaced (a resumed attempt re-logs it). */
  add(points) {
    let changed = false;
    for (const { step, loss } of points) {
      const value = typeof loss === "number" && Number.isFinite(loss) ? loss : null;
      if (!this.steps.length || step > this.lastStep) {
        this.steps.push(step);
        this.losses.push(value);
      } else {
        const i = lowerBound(this.steps, step);
        if (this.steps[i] === step) this.losses[i] = value;
        else {
          this.steps.splice(i, 0, step);
          this.losses.splice(i, 0, value);
        }
      }
      changed = true;
    }
    if (changed) this.scheduleRender();
  }

  /** One redraw per frame, however many events arrive in it (a reconnect replays many). */
  scheduleRender() {
    this.canvas.dataset.points = String(this.steps.length);
    this.canvas.dataset.lastStep = String(this.lastStep);
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  setLogScale(on) {
    this.chart.options.scales.y.type = on ? "logarithmic" : "linear";
    this.chart.update("none");
  }

  render() {
    const raw = [];
    const smooth = [];
    let ema = 0;
    let weight = 0;
    for (let i = 0; i < this.steps.length; i += 1) {
      const x = this.steps[i];
      const y = this.losses[i];
      raw.push({ x, y });
      if (y !== null && y > 0) {
        ema = SMOOTHING * ema + (1 - SMOOTHING) * y;
        weight = SMOOTHING * weight + (1 - SMOOTHING);
        smooth.push({ x, y: ema / weight });
      }
    }
    const [rawSet, smoothSet] = this.chart.data.datasets;
    rawSet.data = raw;
    smoothSet.data = smooth;
    this.chart.update("none");
  }

  destroy() {
    this.pending = true; // no redraw after this
    this.chart.destroy();
  }
}

// A log axis over a narrow range labels every 0.01; keep about eight labels, evenly spaced
// (the last one too, unless it would crowd its neighbour).
function thinLogTicks(axis) {
  const ticks = axis.ticks;
  if (axis.type !== "logarithmic" || ticks.length <= 8) return;
  const every = Math.ceil(ticks.length / 8);
  const last = ticks.length - 1;
  axis.ticks = ticks.filter((_, i) => i % every === 0 || (i === last && last % every >= every / 2));
}

function lowerBound(sorted, value) {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
