"""The report's page: one self-contained HTML file.

Everything the page shows travels inside it: the CSS is inline, figures are PNGs in data: URIs, an
explanation page from `nnlab explain` sits in a sandboxed <iframe srcdoc>. There are no scripts,
fonts, stylesheets or links that leave the page, so it opens offline and requests nothing.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 0; }
main { max-width: 1040px; margin: 0 auto; padding: 1.5em 2em 4em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2.2em; }
h3 { font-size: 1.05em; margin-top: 1.6em; }
.meta { color: #555; margin-top: 0; }
nav { background: #f5f5f7; border-radius: 6px; padding: 0.6em 1.2em; }
nav ol { margin: 0.3em 0; padding-left: 1.4em; }
nav .missing { color: #888; }
details summary { cursor: pointer; color: #1f5fbf; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d5; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.deep td { font-weight: 600; background: #eef5ff; }
pre { background: #f5f5f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; line-height: 1.35; }
code { background: #f0f0f3; padding: 0 0.25em; border-radius: 3px; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e5e5ea; }
figcaption { color: #555; font-size: 0.9em; }
iframe { width: 100%; height: 420px; border: 1px solid #e5e5ea; }
.absent { color: #666; font-style: italic; }
.warning { background: #fff4e5; border-left: 4px solid #e8910c; padding: 0.5em 0.8em; }
.fail { background: #fdecea; border-left: 4px solid #d93025; padding: 0.5em 0.8em; }
.ok { color: #137333; }
"""

# (src|href) pointing at another origin: a page that has one would make a request when opened.
REMOTE_REF = re.compile(r"""\b(?:src|href|srcset|action|poster)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.IGNORECASE)


@dataclass
class Section:
    """One <section> of the page: its anchor id, heading, HTML body parts and visible warnings."""

    id: str
    title: str
    body: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    made: bool = True  # False: the data is absent and the body says which command makes it

    def add(self, *parts: str) -> Section:
        self.body.extend(parts)
        return self

    def warn(self, text: str) -> Section:
        self.warnings.append(text)
        return self


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def p(text: str, cls: str | None = None) -> str:
    """A paragraph of plain text (escaped)."""
    return f'<p class="{cls}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>"


def code(text: str) -> str:
    return f"<code>{esc(text)}</code>"


def pre(text: str, bold_prefix: str = "") -> str:
    """Preformatted text; bold_prefix (a prompt, say) is set in bold before it."""
    return f"<pre>{'<strong>' + esc(bold_prefix) + '</strong>' if bold_prefix else ''}{esc(text)}</pre>"


def absent(what: str, command: str) -> str:
    """The line a section shows when its data is not in the run folder: which command makes it."""
    return f'<p class="absent">No {esc(what)} in this run folder: produced by {code(command)}.</p>'


def plural(n, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def num(x, spec: str = ".4g") -> str:
    """A number as text (thousands separated), None as a dash, anything else as it is."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "—" if x is None else str(x)
    return f"{x:,}" if isinstance(x, int) else format(x, spec)


def table(columns: list[str] | None, rows: list[list], numeric: set[int] = frozenset(),
          row_classes: list[str] | None = None) -> str:
    """A table; cells are escaped, columns whose index is in `numeric` are right-aligned. columns
    None: a table of name-value rows, without a header."""
    head = "<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr></thead>" if columns else ""
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{esc(num(c))}</td>' if j in numeric else f"<td>{esc(c)}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def figure(uri: str, caption: str, alt: str | None = None) -> str:
    return (f'<figure><img src="{esc(uri)}" alt="{esc(alt or caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def embedded_page(page_html: str, title: str) -> str:
    """Another HTML page inside this one, sandboxed: no scripts run and it cannot reach this page."""
    return f'<iframe sandbox title="{esc(title)}" srcdoc="{esc(page_html)}"></iframe>'


def render(title: str, meta: str, sections: list[Section]) -> str:
    """The whole page: heading, a table of contents, then every section in order."""
    toc = "".join(f'<li{"" if s.made else " class=missing"}><a href="#{s.id}">{esc(s.title)}</a>'
                  f'{"" if s.made else " (not made)"}</li>' for s in sections)
    parts = []
    for s in sections:
        warns = "".join(f'<p class="warning">Warning: {esc(w)}</p>' for w in s.warnings)
        parts.append(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{warns}{"".join(s.body)}</section>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
            f"<body><main><h1>{esc(title)}</h1><p class=meta>{esc(meta)}</p>"
            f"<nav><strong>Contents</strong><ol>{toc}</ol></nav>\n" + "\n".join(parts) + "\n</main></body></html>\n")
