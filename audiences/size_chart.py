"""Audience size over time as an SVG image: a step line (a size holds until the next point), date and size axes.

Hand-written SVG: a line, a few labels and a grid need no plotting library, and the image renders anywhere
(browsers, GitHub, mail clients that show images). The input is what audiences.membership.size_history returns;
the caller appends (now, last size) when the line should run up to the present.
"""

from __future__ import annotations

from datetime import UTC, datetime
from xml.sax.saxutils import escape, quoteattr

WIDTH, HEIGHT = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 44, 44, 52  # margins: room for size labels, half a date, the title, two lines of dates
MAX_MARKERS = 200  # one hover marker per point up to this many; beyond, markers would only blur the line

_MINUTE, _HOUR, _DAY = 60_000, 3_600_000, 86_400_000
_TIME_STEPS = (_MINUTE, 5 * _MINUTE, 15 * _MINUTE, 30 * _MINUTE, _HOUR, 3 * _HOUR, 6 * _HOUR, 12 * _HOUR,
               _DAY, 2 * _DAY, 7 * _DAY, 14 * _DAY, 30 * _DAY, 91 * _DAY, 365 * _DAY)
_MAX_TICKS = 6

_STYLE = ("text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:12px;fill:#374151}"
          ".title{font-size:15px;font-weight:600;fill:#111827}.grid{stroke:#e5e7eb;stroke-width:1}"
          ".axis{stroke:#9ca3af;stroke-width:1}.line{fill:none;stroke:#2563eb;stroke-width:2;stroke-linejoin:round}"
          ".point{fill:#2563eb}")


def size_chart_svg(points: list[tuple[int, int]], title: str) -> str:
    """An SVG document charting (at_ms, size) points, in any order, under `title`."""
    ordered = sorted(points)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label={quoteattr(title)}>',
             f"<style>{_STYLE}</style>",
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
             f'<text class="title" x="{LEFT}" y="26">{escape(title)}</text>']
    if not ordered:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no size recorded yet</text>')
        return "".join(parts) + "</svg>\n"
    start, end = ordered[0][0], ordered[-1][0]
    if start == end:  # one moment: give it an hour either side so it has somewhere to stand
        start, end = start - _HOUR, end + _HOUR
    largest = max(size for _, size in ordered)
    step = _nice_ceiling(-(-largest // 5))  # at most five grid steps up to the largest size
    top = -(-largest // step) * step or step
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at_ms: int) -> float:
        return round(LEFT + (at_ms - start) * plot_width / (end - start), 1)

    def y(size: int) -> float:
        return round(TOP + plot_height - size * plot_height / top, 1)

    for value in range(0, top + 1, step):
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{y(value)}" x2="{WIDTH - RIGHT}" y2="{y(value)}"/>'
                     f'<text x="{LEFT - 8}" y="{y(value) + 4}" text-anchor="end">{_size_label(value)}</text>')
    for at_ms, lines in _time_ticks(start, end):
        parts.append(f'<line class="grid" x1="{x(at_ms)}" y1="{TOP}" x2="{x(at_ms)}" y2="{TOP + plot_height}"/>')
        for row, text in enumerate(lines):
            parts.append(f'<text x="{x(at_ms)}" y="{TOP + plot_height + 18 + 14 * row}" '
                         f'text-anchor="middle">{text}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_height}" x2="{WIDTH - RIGHT}" '
                 f'y2="{TOP + plot_height}"/>')
    parts.append(f'<text x="{WIDTH - 6}" y="{HEIGHT - 6}" text-anchor="end">UTC</text>')
    vertices = [(x(ordered[0][0]), y(ordered[0][1]))]
    for (_, previous), (at_ms, size) in zip(ordered, ordered[1:]):
        vertices += [(x(at_ms), y(previous)), (x(at_ms), y(size))]
    parts.append(f'<polyline class="line" points="{" ".join(f"{a},{b}" for a, b in vertices)}"/>')
    if len(ordered) <= MAX_MARKERS:
        for at_ms, size in ordered:
            parts.append(f'<circle class="point" cx="{x(at_ms)}" cy="{y(size)}" r="3">'
                         f"<title>{_moment(at_ms)} UTC: {size:,}</title></circle>")
    return "".join(parts) + "</svg>\n"


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above `value` (at least 1)."""
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            if factor * magnitude >= value:
                return factor * magnitude
        magnitude *= 10


def _size_label(value: int) -> str:
    for unit, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if value >= unit:
            return f"{value / unit:.3g}{suffix}"
    return str(value)


def _time_ticks(start: int, end: int) -> list[tuple[int, list[str]]]:
    """Ticks at round UTC times, at most _MAX_TICKS of them, each labelled with its date, and its time of day
    when the step is shorter than a day."""
    step = next((s for s in _TIME_STEPS if (end - start) // s < _MAX_TICKS), None)
    if step is None:  # longer than the largest step allows: whole years' worth of days
        step = -(-(end - start) // (_MAX_TICKS * _DAY)) * _DAY
    first = -(-start // step) * step
    ticks = []
    for at_ms in range(first, end + 1, step):
        moment = datetime.fromtimestamp(at_ms / 1000, tz=UTC)
        lines = [moment.strftime("%Y-%m-%d")] + ([moment.strftime("%H:%M")] if step < _DAY else [])
        ticks.append((at_ms, lines))
    return ticks


def _moment(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
