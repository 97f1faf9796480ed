"""The loss curve as a PNG, for reports and chats (matplotlib, headless)."""

from __future__ import annotations

import io
import math

from app.models import MetricPoint


def loss_curve_png(points: list[MetricPoint], *, title: str, log_scale: bool) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    finite = [(p.step, p.loss) for p in points if p.loss is not None and math.isfinite(p.loss)]
    if finite:
        steps, losses = zip(*finite, strict=True)
        axes.plot(steps, losses, color="#2563eb", linewidth=1.5)
    else:
        axes.text(0.5, 0.5, "no loss recorded yet", ha="center", va="center", transform=axes.transAxes)
    if log_scale and finite and min(losses) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (mean per log window)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
