"""Small inline SVG charts for the batch report: histograms (one or two runs overlaid) and a bar
chart. Plain strings, no scripts and nothing fetched, so the report is one self-contained file."""

from __future__ import annotations

from html import escape

COLOURS = ("#1f5fbf", "#c2571a")  # run A, run B (distinct for colour-blind readers too)
W, H, PAD_L, PAD_B, PAD_T = 520, 220, 44, 34, 12


def histogram(title: str, series: list[tuple[str, list[float]]], lo: float, hi: float, bins: int = 20,
              unit: str = "") -> str:
    """Shares per bin (so runs of different sizes compare), one colour per run, outlined bars."""
    if not any(v is not None for _, values in series for v in values):
        return f'<p class="empty">{escape(title)}: no values.</p>'
    width = (hi - lo) / bins
    shares = []
    for _, values in series:
        counts = [0] * bins
        for v in values:
            if v is None:
                continue
            i = min(bins - 1, max(0, int((v - lo) / width)))
            counts[i] += 1
        n = max(1, sum(counts))
        shares.append([c / n for c in counts])
    top = max([max(s) for s in shares] + [0.01])
    plot_w, plot_h = W - PAD_L - 10, H - PAD_B - PAD_T
    bar_w = plot_w / bins / max(1, len(series))
    full_h = H + 14 * (len(series) - 1)  # one legend row per run: long run names never overlap
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {W} {full_h}" width="{W}" height="{full_h}" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - 10}" y2="{H - PAD_B}" stroke="#555"/>',
             f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="#555"/>']
    for k, s in enumerate(shares):
        for i, share in enumerate(s):
            if share <= 0:
                continue
            h = plot_h * share / top
            x = PAD_L + i * plot_w / bins + k * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{H - PAD_B - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                         f'fill="{COLOURS[k % 2]}" fill-opacity="0.75"><title>{escape(series[k][0])}: '
                         f'{lo + i * width:.2f}..{lo + (i + 1) * width:.2f}{unit}: {100 * share:.1f}%</title></rect>')
    for frac, anchor in ((0, "middle"), (0.5, "middle"), (1, "end")):  # the last label kept inside the chart
        x = PAD_L + frac * plot_w
        parts.append(f'<text x="{x:.1f}" y="{H - PAD_B + 16}" font-size="11" text-anchor="{anchor}">'
                     f'{lo + frac * (hi - lo):.2f}{unit}</text>')
    parts.append(f'<text x="{PAD_L - 6}" y="{PAD_T + 10}" font-size="11" text-anchor="end">{100 * top:.0f}%</text>')
    parts.append(f'<text x="{PAD_L - 6}" y="{H - PAD_B}" font-size="11" text-anchor="end">0</text>')
    for k, (name, values) in enumerate(series):
        x, y = PAD_L + 10, H - 12 + 14 * k
        parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{COLOURS[k % 2]}"/>'
                     f'<text x="{x + 14}" y="{y + 9}" font-size="11">{escape(name)} (n={sum(v is not None for v in values)})</text>')
    parts.append("</svg>")
    return "".join(parts)


def bars(title: str, labels: list[str], series: list[tuple[str, list[int]]]) -> str:
    """Horizontal bars: one row per label, one bar per run."""
    if not labels:
        return f'<p class="empty">{escape(title)}: none.</p>'
    row_h = 14 * len(series) + 8
    height = PAD_T + row_h * len(labels) + 24
    top = max([max(v) for _, v in series] + [1])
    label_w = 170
    plot_w = W - label_w - 40
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {W} {height}" width="{W}" height="{height}" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>']
    for r, label in enumerate(labels):
        y0 = PAD_T + r * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y0 + row_h / 2 + 3:.1f}" font-size="11" text-anchor="end">'
                     f'{escape(label[:28])}</text>')
        for k, (name, values) in enumerate(series):
            w = plot_w * values[r] / top
            y = y0 + 4 + k * 14
            parts.append(f'<rect x="{label_w}" y="{y}" width="{max(w, 0.5):.1f}" height="12" fill="{COLOURS[k % 2]}">'
                         f'<title>{escape(name)}: {values[r]}</title></rect>'
                         f'<text x="{label_w + w + 4:.1f}" y="{y + 10}" font-size="10">{values[r]}</text>')
    parts.append("</svg>")
    return "".join(parts)
