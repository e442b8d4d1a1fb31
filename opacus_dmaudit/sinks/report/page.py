"""Pieces of the self-contained HTML pages: head and style, tables, figures, fixed texts.

Every string that comes from a record or a file is escaped here; pages load nothing from outside.
"""

from __future__ import annotations

import html

__all__ = [
    "PRIVATE_NOTICE",
    "EXPLANATION",
    "head",
    "table",
    "figure",
    "details",
    "key_numbers",
    "panels",
]

PRIVATE_NOTICE = (
    "This report contains images of private training data (true training images and their "
    "reconstructions). Keep it where only people allowed to see the training data can read it."
)

EXPLANATION = """
<p>The auditor plays the strongest realistic attacker against DP-SGD: the model's first layer is an
<em>imprint layer</em> that routes each training image into the gradient of one row of a linear
layer. From the privatised (clipped and noised) gradient of a step, each singly-occupied row gives
the image back plus Gaussian noise whose size the noise multiplier σ sets. The <em>raw readout</em>
is that noisy image; the <em>DM reconstruction</em> denoises it with a diffusion model trained on
public images of the same kind; the <em>clean</em> stage reads the clipped gradient before noise
(what an attacker would get without DP). In <em>shadow</em> mode the imprint layer is simulated on
the real batch at this run's clipping bound and noise; the model itself has none.</p>
<p><strong>What it can show:</strong> whether training images are recognisable from one step's
privatised gradient, for this model, data and noise level; how this compares with the formal
reconstruction-robustness (ReRo) bounds; whether the DP mechanism matches what the accountant
assumes (the checks).</p>
<p><strong>What it cannot show:</strong> that a run is private. A failed reconstruction is evidence
about this attack, not proof; the bounds are the guarantee. And <strong>at high noise the DM output
is a plausible sample of the prior, not evidence of leakage</strong>: a crisp digit may be a digit
the prior invented. Judge reconstructions by their agreement with the truth (the metrics), never by
how realistic they look.</p>
<p>The bounds: for a baseline κ (the success rate at the same criterion of the best guess without
the gradient) no attack can succeed with probability above the bound. The per-audit bounds are
for the step the audit reads (one Gaussian mechanism), the same event as the per-audit success
rate; the whole-run bounds cover an attack that may use every step so far, another event.</p>
"""

_STYLE = (
    "body{font-family:sans-serif;max-width:78em;margin:.6em auto;padding:0 1em;line-height:1.3}"
    "h1{font-size:1.45em;margin:.35em 0}h2{font-size:1.1em;margin:.5em 0 .3em}"
    ".notice{background:#fff3cd;border:1px solid #c90;padding:.3em .6em;font-size:.8em;margin:0}"
    ".fail{background:#f8d7da;border:2px solid #b02a37;padding:.4em .6em;color:#58151c}"
    ".warn{background:#fff8e1;border:1px solid #c90;padding:.4em}"
    "td.fail,td.warn{padding:2px 6px}.small{font-size:.8em;color:#444;margin:.2em 0}"
    "h1.verdict{border-left:.35em solid #888;padding-left:.4em}"
    "h1.leakage{border-color:#b02a37}h1.invalid{border-color:#b02a37;color:#58151c}"
    "h1.no_visible_leakage,h1.mechanism_ok{border-color:#2e7d32}"
    ".numbers{display:flex;flex-wrap:wrap;gap:.4em;margin:.3em 0;padding:0}"
    ".numbers div{border:1px solid #ccc;border-radius:4px;padding:.15em .5em;min-width:7em}"
    ".numbers dt{font-size:.72em;color:#555}.numbers dd{margin:0;font-weight:bold}"
    ".numbers dd small{font-weight:normal;color:#555;font-size:.72em;display:block}"
    ".row{display:flex;align-items:flex-start;gap:.3em;margin:.2em 0}"
    ".rowlabel{writing-mode:vertical-rl;transform:rotate(180deg);font-size:.75em;color:#555;"
    "text-align:center;align-self:center}"
    ".panels{display:flex;flex-wrap:wrap;gap:.35em}"
    "figure{margin:0}figure.panel{border:1px solid #ccc;border-radius:4px;padding:.2em;"
    "width:196px}figure.panel.unfaithful{border:2px dashed #b02a37}"
    ".trio{display:flex;gap:4px}.pic{text-align:center;font-size:.68em;color:#444}"
    ".pic img{width:60px;height:auto;image-rendering:pixelated;display:block;background:#000}"
    ".pic.unfaithful img{outline:2px dashed #b02a37}"
    "figure.panel>figcaption{font-size:.7em;line-height:1.2;color:#222;margin-top:.15em}"
    "figure.panel>figcaption .flag{color:#b02a37;font-weight:bold}"
    ".ladders{display:flex;flex-wrap:wrap;gap:.3em 1.2em}"
    ".ladder{display:flex;gap:.3em;align-items:flex-start;margin:.3em 0;max-width:100%;"
    "overflow-x:auto}.rowlabels{display:flex;flex-direction:column;font-size:.7em;color:#555}"
    ".rowlabels span{height:58px;margin-bottom:2px;display:flex;align-items:center}"
    "figure.rung{border:1px solid #ccc;border-radius:4px;padding:.2em;width:112px}"
    "figure.rung.closest{border:1px dashed #888}"
    "figure.rung img,.rung .empty{width:56px;height:56px;display:block;margin:0 auto 2px;"
    "image-rendering:pixelated;background:#000}.rung .empty{background:#eee;text-align:center}"
    "figure.rung figcaption{font-size:.66em;line-height:1.2;color:#222}"
    "details{border-top:1px solid #ddd;padding:.25em 0}summary{cursor:pointer;font-weight:bold}"
    "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #bbb;padding:2px 6px}"
    ".scroll{overflow-x:auto;max-width:100%}"
    "img{max-width:100%}figcaption{font-size:.85em;color:#444}pre{white-space:pre-wrap}"
)


def head(title: str) -> str:
    """Start of a self-contained page: no external resource, inline style."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
    )


def table(rows: list[list[str]], header: list[str], classes: list[str] | None = None) -> str:
    """An HTML table of plain strings (escaped), with an optional CSS class per row."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f" class='{classes[i]}'" if classes and classes[i] else ""
        body.append(
            "<tr" + cls + ">" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        )
    return (
        f"<div class='scroll'><table><thead><tr>{th}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def figure(title: str, png: str | None, caption: str = "") -> str:
    """A figure of an inline base64 PNG with its caption (nothing when ``png`` is ``None``)."""
    if png is None:
        return ""
    esc = html.escape
    return (
        f"<figure><img alt='{esc(title)}' src='data:image/png;base64,{png}'>"
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def details(anchor: str, title: str, body: str, *, open_: bool = False) -> str:
    """A collapsible section (``body`` is HTML made here; ``title`` is escaped)."""
    state = " open" if open_ else ""
    return (
        f"<details id='{html.escape(anchor)}'{state}><summary>{html.escape(title)}</summary>"
        f"{body}</details>"
    )


def key_numbers(numbers: list[tuple[str, str, str]]) -> str:
    """The key numbers as a row of small boxes: ``(label, value, note)`` each."""
    esc = html.escape
    boxes = "".join(
        f"<div><dt>{esc(label)}</dt><dd>{esc(value)}<small>{esc(note)}</small></dd></div>"
        for label, value, note in numbers
    )
    return f"<dl class='numbers' id='key-numbers'>{boxes}</dl>"


def _panel(panel) -> str:
    """One image's pictures side by side, each with its label, and the panel's caption."""
    esc = html.escape
    where = f"step {panel.step} bin {panel.bin}"
    pics = []
    for label, png in panel.pictures:
        if png is None:
            continue
        flagged = panel.unfaithful and label == "DM"
        cls = "pic unfaithful" if flagged else "pic"
        shown = label + (" ⚠" if flagged else "")
        pics.append(
            f"<figure class='{cls}'><img alt='{esc(label)}, {esc(where)}' "
            f"src='data:image/png;base64,{png}'><figcaption>{esc(shown)}</figcaption></figure>"
        )
    lines = []
    for line in panel.caption:
        flag = line.startswith("DM: prior unfaithful")
        lines.append(f"<span class='flag'>{esc(line)}</span>" if flag else esc(line))
    cls = "panel unfaithful" if panel.unfaithful else "panel"
    return (
        f"<figure class='{cls}'><div class='trio'>{''.join(pics)}</div>"
        f"<figcaption>{'<br>'.join(lines)}</figcaption></figure>"
    )


def panels(anchor: str, label: str, items) -> str:
    """A labelled row of image panels (:class:`~.images.Panel`); nothing without panels."""
    if not items:
        return ""
    esc = html.escape
    return (
        f"<div class='row' id='{esc(anchor)}'><div class='rowlabel'>{esc(label)}</div>"
        f"<div class='panels'>{''.join(_panel(p) for p in items)}</div></div>"
    )
