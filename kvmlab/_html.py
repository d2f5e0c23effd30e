"""The small HTML pieces of kvmlab's rich reprs and widgets: tables, bars,
status badges. Colours are JupyterLab's CSS variables (with fallbacks for
other frontends), so everything stays legible on light and dark themes.

Every function returns a string of HTML; text passed in is escaped here.
"""

from __future__ import annotations

import html
from typing import Iterable

__all__ = ["COLOR", "escape", "table", "bar", "badge", "box", "legend", "phases", "pre"]

#: Role -> CSS colour (JupyterLab variable, fallback for other frontends).
COLOR = {
    "text": "var(--jp-ui-font-color1, inherit)",
    "muted": "var(--jp-ui-font-color2, #616161)",
    "background": "var(--jp-layout-color1, transparent)",
    "panel": "var(--jp-layout-color2, #eeeeee)",
    "border": "var(--jp-border-color2, #cccccc)",
    "brand": "var(--jp-brand-color1, #1976d2)",
    "accent": "var(--jp-accent-color1, #388e3c)",
    "ok": "var(--jp-success-color1, #388e3c)",
    "warn": "var(--jp-warn-color1, #f57c00)",
    "fail": "var(--jp-error-color1, #d32f2f)",
    "info": "var(--jp-info-color1, #0097a7)",
    "font": "var(--jp-ui-font-family, sans-serif)",
    "mono": "var(--jp-code-font-family, monospace)",
}


def escape(x: object) -> str:
    return html.escape(str(x))


def box(title: str, body: str, cls: str = "") -> str:
    """A titled block with the theme's text colour and font."""
    return (
        f'<div class="kvmlab-repr {escape(cls)}" style="color:{COLOR["text"]};font-family:{COLOR["font"]};'
        f'font-size:var(--jp-ui-font-size1, 13px);line-height:1.4">'
        f"<div><b>{escape(title)}</b></div>{body}</div>"
    )


def table(rows: Iterable[tuple[object, ...]], header: tuple[str, ...] | None = None, raw_cols: tuple[int, ...] = ()) -> str:
    """An HTML table; cells are escaped except the columns in ``raw_cols``."""
    cell = f"padding:1px 8px;border-bottom:1px solid {COLOR['border']};text-align:left;vertical-align:top"

    def tr(values: tuple[object, ...], tag: str) -> str:
        cells = "".join(
            f'<{tag} style="{cell}">{v if i in raw_cols else escape(v)}</{tag}>' for i, v in enumerate(values)
        )
        return f"<tr>{cells}</tr>"

    head = tr(header, "th") if header else ""
    body = "".join(tr(r, "td") for r in rows)
    return f'<table style="border-collapse:collapse;margin:2px 0;color:{COLOR["text"]}">{head}{body}</table>'


def bar(parts: Iterable[tuple[str, float, str]], total: float, width_px: int = 320) -> str:
    """A horizontal bar of ``(label, value, colour)`` segments out of
    ``total`` (a colour is a :data:`COLOR` role or a CSS colour); the labels
    are the segments' tooltips."""
    total = max(float(total), 1e-12)
    segs = "".join(
        f'<div title="{escape(label)}" style="width:{100 * min(max(v, 0) / total, 1):.2f}%;background:{COLOR.get(role, role)}"></div>'
        for label, v, role in parts
        if v > 0
    )
    return (
        f'<div class="kvmlab-bar" style="display:flex;height:10px;width:{width_px}px;max-width:100%;'
        f'background:{COLOR["panel"]};border:1px solid {COLOR["border"]};margin:3px 0">{segs}</div>'
    )


def badge(status: str) -> str:
    """``status`` (ok / warn / fail / info) as a coloured word."""
    role = status if status in COLOR else "muted"
    return f'<b style="color:{COLOR[role]}">{escape(status)}</b>'


def legend(parts: Iterable[tuple[str, str, str]]) -> str:
    """``(label, text, colour)`` as a line of coloured squares with text."""
    return " &middot; ".join(
        f'<span style="color:{COLOR.get(c, c)}">&#9632;</span> {escape(label)} {escape(text)}' for label, text, c in parts
    )


def phases(title: str, values_ns: dict[str, int], colors: dict[str, str], total_ns: int, note: str = "", cls: str = "") -> str:
    """A record's phases as a stacked bar, a legend and the total."""
    from .units import choose_unit, fmt_time

    unit = choose_unit([total_ns])
    body = (
        f"total <b>{escape(fmt_time(total_ns))}</b>{escape(note)}"
        + bar([(f"{p}: {fmt_time(v, unit)}", v, colors[p]) for p, v in values_ns.items()], max(total_ns, sum(values_ns.values())))
        + f'<span style="font-size:90%">{legend((p, fmt_time(v, unit), colors[p]) for p, v in values_ns.items())}</span>'
    )
    return box(title, body, cls)


def pre(text: str) -> str:
    """Preformatted console text on the theme's panel colour."""
    return (
        f'<pre style="margin:2px 0;padding:4px 6px;background:{COLOR["panel"]};color:{COLOR["text"]};'
        f'font-family:{COLOR["mono"]};white-space:pre-wrap">{escape(text)}</pre>'
    )
