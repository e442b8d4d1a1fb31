"""Pieces of the self-contained HTML pages: head and style, tables, figures, fixed texts.

Every string that comes from a record or a file is escaped here; pages load nothing from outside.
"""

from __future__ import annotations

import html

__all__ = ["PRIVATE_NOTICE", "EXPLANATION", "head", "table", "figure"]

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
    "body{font-family:sans-serif;max-width:64em;margin:2em auto;padding:0 1em}"
    ".notice{background:#fff3cd;border:2px solid #c90;padding:.8em;font-weight:bold}"
    ".fail{background:#f8d7da;border:2px solid #b02a37;padding:.8em;color:#58151c}"
    ".warn{background:#fff8e1;border:1px solid #c90;padding:.5em}"
    "td.fail,td.warn{padding:2px 6px}"
    "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #bbb;padding:2px 6px}"
    "img{max-width:100%}figcaption{font-size:.85em;color:#444}"
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
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(title: str, png: str | None, caption: str = "") -> str:
    """A figure of an inline base64 PNG with its caption (nothing when ``png`` is ``None``)."""
    if png is None:
        return ""
    esc = html.escape
    return (
        f"<figure><img alt='{esc(title)}' src='data:image/png;base64,{png}'>"
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )
