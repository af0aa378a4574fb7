"""``report.html``: the evaluation a person opens instead of reading ``eval.json``.

One self-contained file: every image is inlined as a base64 PNG, the charts are inline SVG, the style sheet is
inline and there is no script at all. A Content-Security-Policy meta tag forbids every other source, so the page
never touches the network (and a browser reports any slip as a console error, which the test looks for).

Per reward (one section each when an evaluation scores with several) and per split it shows:
  * the headline numbers: mean reward gain with its percentile-bootstrap 95% CI, win-rate with the tie band,
    wins/ties/losses, drift from the base and, when the reward offers it, accuracy;
  * reward histograms, base against tuned, on shared bins;
  * per-prompt win-rate bars with bootstrap 95% CIs (a win counts 1, a tie ½, a loss 0, so the win-rate is the
    mean of these per-seed outcomes and its CI the bootstrap of that mean);
  * labelled grids: the prompt over each block, a "base" and a "tuned" row from the same noise, the reward under
    every image (green where tuned beat base beyond the tie band, red where it lost). Tiny images are enlarged
    with nearest-neighbour on the server and drawn with ``image-rendering: pixelated``, so they are never blurred.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from diffalign.eval import EvalReport, bootstrap_ci, outcome_values
from diffalign.media import encode_image_bytes, enlarge_nearest, filmstrip, tensor_to_pil

#: smallest side, in pixels, an image is enlarged to (by whole multiples, nearest-neighbour)
THUMB_PX = 96
_BASE_COLOUR, _TUNED_COLOUR = "#4c72b0", "#dd8452"
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#1a1a1a;
     max-width:1200px}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:2px solid #ccc;padding-bottom:4px;margin-top:36px}
h3{margin-top:26px} .meta{color:#555;font-size:.9em}
table.numbers{border-collapse:collapse;margin:8px 0;font-size:.92em}
table.numbers th,table.numbers td{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.numbers th:first-child,table.numbers td:first-child{text-align:left}
table.numbers tr.all td{font-weight:600;background:#f4f4f4}
.charts{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
figure{margin:0} figcaption{font-size:.85em;color:#444;max-width:520px}
.grid{margin:10px 0 18px 0} .grid .prompt{font-weight:600;margin:6px 0}
.grid table{border-collapse:collapse} .grid th{font-weight:500;padding-right:8px;text-align:right;color:#333}
.grid td{padding:2px 4px;text-align:center;vertical-align:top}
.grid img{image-rendering:pixelated;display:block;border:1px solid #ddd}
.score{font-size:.8em;font-variant-numeric:tabular-nums} .win{color:#007a00} .loss{color:#b40000}
.note{color:#666;font-style:italic}
"""


@dataclass
class SplitResult:
    """One split of one reward: the numbers and what they were computed from (media [P, S, …], scores [P, S])."""

    report: EvalReport
    prompts: Sequence[str]
    base: torch.Tensor | None
    tuned: torch.Tensor | None
    base_scores: torch.Tensor
    tuned_scores: torch.Tensor


@dataclass
class ReportSection:
    """Everything one reward says about the run."""

    reward: str
    splits: list[SplitResult] = field(default_factory=list)


# --- small pieces ---------------------------------------------------------------------------------------------------
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: float, spec: str = ".3f") -> str:
    return "–" if x is None or not math.isfinite(float(x)) else format(float(x), spec)


def image_data_uri(image: torch.Tensor, min_px: int = THUMB_PX) -> tuple[str, int, int]:
    """[C, H, W] in [0, 1] -> (PNG data URI, width, height), enlarged by a whole factor (nearest-neighbour) until
    the shorter side is at least ``min_px``, so small samples stay sharp at a readable size."""
    pil = enlarge_nearest(tensor_to_pil(image.detach().float().clamp(0, 1).cpu()), min_px)
    data = base64.b64encode(encode_image_bytes(pil, "PNG")).decode("ascii")
    return f"data:image/png;base64,{data}", pil.width, pil.height


def _previewable(media: torch.Tensor | None) -> torch.Tensor | None:
    """Images [P, S, C, H, W] as they are, videos [P, S, F, C, H, W] as filmstrips, anything else: no preview."""
    if media is None:
        return None
    if media.dim() == 6:
        media = filmstrip(media)
    if media.dim() == 5 and media.shape[2] in (1, 3):
        return media
    return None


# --- charts ---------------------------------------------------------------------------------------------------------
def histogram_svg(base: torch.Tensor, tuned: torch.Tensor, *, bins: int = 20, width: int = 520,
                  height: int = 220) -> str:
    """Two reward histograms on shared bins, base and tuned bars side by side within each bin."""
    b = base.detach().double().reshape(-1).cpu()
    t = tuned.detach().double().reshape(-1).cpu()
    both = torch.cat([b, t])
    both = both[torch.isfinite(both)]
    if both.numel() == 0:
        return "<p class='note'>no finite rewards to plot</p>"
    lo, hi = float(both.min()), float(both.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    cb = torch.histc(b[torch.isfinite(b)].float(), bins=bins, min=lo, max=hi)
    ct = torch.histc(t[torch.isfinite(t)].float(), bins=bins, min=lo, max=hi)
    top = max(float(cb.max()), float(ct.max()), 1.0)
    left, right, upper, lower = 40, 10, 24, 34
    pw, ph = width - left - right, height - upper - lower
    bw = pw / bins
    parts = [f"<svg width='{width}' height='{height}' role='img' "
             f"aria-label='reward histogram, base vs tuned'>",
             f"<line x1='{left}' y1='{upper + ph}' x2='{left + pw}' y2='{upper + ph}' stroke='#333'/>",
             f"<line x1='{left}' y1='{upper}' x2='{left}' y2='{upper + ph}' stroke='#333'/>"]
    for k in range(bins):
        for n, (counts, colour) in enumerate(((cb, _BASE_COLOUR), (ct, _TUNED_COLOUR))):
            h = ph * float(counts[k]) / top
            x = left + k * bw + n * bw / 2
            parts.append(f"<rect x='{x:.1f}' y='{upper + ph - h:.1f}' width='{bw / 2 - 0.5:.1f}' height='{h:.1f}' "
                         f"fill='{colour}'><title>{'base' if n == 0 else 'tuned'}: {int(counts[k])} samples in "
                         f"[{lo + k * (hi - lo) / bins:.3f}, {lo + (k + 1) * (hi - lo) / bins:.3f})</title></rect>")
    parts += [f"<text x='{left}' y='{height - 16}' font-size='11' text-anchor='start'>{lo:.3f}</text>",
              f"<text x='{left + pw}' y='{height - 16}' font-size='11' text-anchor='end'>{hi:.3f}</text>",
              f"<text x='{left + pw / 2}' y='{height - 2}' font-size='11' text-anchor='middle'>reward</text>",
              f"<text x='{left - 4}' y='{upper + 4}' font-size='11' text-anchor='end'>{int(top)}</text>",
              f"<text x='{left - 4}' y='{upper + ph}' font-size='11' text-anchor='end'>0</text>",
              f"<rect x='{left + 8}' y='4' width='12' height='12' fill='{_BASE_COLOUR}'/>",
              f"<text x='{left + 24}' y='14' font-size='12'>base (mean {float(b.mean()):.3f})</text>",
              f"<rect x='{left + 200}' y='4' width='12' height='12' fill='{_TUNED_COLOUR}'/>",
              f"<text x='{left + 216}' y='14' font-size='12'>tuned (mean {float(t.mean()):.3f})</text>", "</svg>"]
    return "".join(parts)


def win_rate_bars_svg(rows: Sequence[tuple[str, float, float, float]], *, width: int = 620) -> str:
    """Horizontal bars: (label, win-rate, CI low, CI high) per row on a 0..1 axis, a dashed line at ½ (no
    difference), the CI drawn as a whisker."""
    label_w, right, row_h, upper = 220, 60, 24, 22
    pw = width - label_w - right
    height = upper + row_h * len(rows) + 24
    x0 = label_w
    parts = [f"<svg width='{width}' height='{height}' role='img' "
             f"aria-label='win-rate per prompt with 95% CI'>"]
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x0 + v * pw
        dash = " stroke-dasharray='4 3'" if v == 0.5 else ""
        parts.append(f"<line x1='{x:.1f}' y1='{upper - 4}' x2='{x:.1f}' y2='{height - 20}' stroke='#999'{dash}/>")
        parts.append(f"<text x='{x:.1f}' y='{height - 6}' font-size='11' text-anchor='middle'>{v:g}</text>")
    for k, (label, rate, lo, hi) in enumerate(rows):
        y = upper + k * row_h
        short = label if len(label) <= 32 else label[:31] + "…"
        parts.append(f"<text x='{label_w - 8}' y='{y + 15}' font-size='12' text-anchor='end'>{_esc(short)}"
                     f"<title>{_esc(label)}</title></text>")
        if not math.isfinite(rate):
            continue
        colour = "#2e8b57" if lo > 0.5 else "#c0392b" if hi < 0.5 else "#8c8c8c"
        parts.append(f"<rect x='{x0}' y='{y + 5}' width='{rate * pw:.1f}' height='{row_h - 10}' fill='{colour}' "
                     f"opacity='0.8'><title>win-rate {rate:.3f}, 95% CI [{lo:.3f}, {hi:.3f}]</title></rect>")
        parts.append(f"<line x1='{x0 + lo * pw:.1f}' y1='{y + row_h / 2}' x2='{x0 + hi * pw:.1f}' "
                     f"y2='{y + row_h / 2}' stroke='#111' stroke-width='1.5'/>")
        for edge in (lo, hi):
            parts.append(f"<line x1='{x0 + edge * pw:.1f}' y1='{y + 7}' x2='{x0 + edge * pw:.1f}' "
                         f"y2='{y + row_h - 7}' stroke='#111' stroke-width='1.5'/>")
        parts.append(f"<text x='{x0 + pw + 6}' y='{y + 15}' font-size='11'>{rate:.2f}</text>")
    parts.append("</svg>")
    return "".join(parts)


# --- sections -------------------------------------------------------------------------------------------------------
def _numbers_table(rep: EvalReport, cis: Sequence[tuple[float, float]], overall_ci: tuple[float, float]) -> str:
    acc = "accuracy base" in rep.extra
    head = ["prompt", "reward base", "reward tuned", "gain", "win-rate [95% CI]", "drift"]
    head += ["accuracy base", "accuracy tuned"] if acc else []
    rows = ["<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for r, (lo, hi) in zip(rep.prompts, cis):
        cells = [r.prompt, _fmt(r.reward_base), _fmt(r.reward_tuned), _fmt(r.reward_tuned - r.reward_base, "+.3f"),
                 f"{_fmt(r.win_rate)} [{_fmt(lo)}, {_fmt(hi)}]", _fmt(r.drift, ".4f")]
        if acc:
            cells += [_fmt(r.extra.get("accuracy base", float("nan"))),
                      _fmt(r.extra.get("accuracy tuned", float("nan")))]
        rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    glo, ghi = rep.gain_ci
    cells = ["all prompts", _fmt(rep.reward_base), _fmt(rep.reward_tuned),
             f"{_fmt(rep.reward_gain, '+.3f')} [{_fmt(glo, '+.3f')}, {_fmt(ghi, '+.3f')}]",
             f"{_fmt(rep.win_rate)} [{_fmt(overall_ci[0])}, {_fmt(overall_ci[1])}]", _fmt(rep.drift, ".4f")]
    if acc:
        cells += [_fmt(rep.extra["accuracy base"]), _fmt(rep.extra.get("accuracy tuned", float("nan")))]
    rows.append("<tr class='all'>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    return "<table class='numbers'>" + "".join(rows) + "</table>"


def _grid_html(split: SplitResult, per_prompt: int, tie_band: float) -> str:
    media_b, media_t = _previewable(split.base), _previewable(split.tuned)
    if media_b is None or media_t is None:
        return "<p class='note'>No preview for this modality; the numbers above are computed from the samples.</p>"
    n = min(per_prompt, media_b.shape[1])
    blocks = []
    won = outcome_values(split.tuned_scores, split.base_scores, tie_band)  # [P, S]: 1 / ½ / 0
    for i, prompt in enumerate(split.prompts):
        rows = []
        for label, media, scores in (("base", media_b, split.base_scores), ("tuned", media_t, split.tuned_scores)):
            cells = []
            for j in range(n):
                uri, w, h = image_data_uri(media[i, j])
                value = float(scores[i, j])
                cls = "" if label == "base" else {1.0: " win", 0.0: " loss"}.get(float(won[i, j]), "")
                cells.append(f"<td><img src='{uri}' width='{w}' height='{h}' alt='{label}, seed {j}: reward "
                             f"{value:.3f}'><div class='score{cls}'>{value:.3f}</div></td>")
            rows.append(f"<tr><th scope='row'>{label}</th>{''.join(cells)}</tr>")
        blocks.append(f"<div class='grid'><div class='prompt'>{_esc(prompt)}</div><table>{''.join(rows)}</table>"
                      "</div>")
    return "".join(blocks)


def _split_html(section: ReportSection, split: SplitResult, per_prompt: int) -> str:
    rep = split.report
    tie_band = rep.tie_band
    cis, bar_rows = [], []
    for i, r in enumerate(rep.prompts):
        values = outcome_values(split.tuned_scores[i], split.base_scores[i], tie_band)
        lo, hi = bootstrap_ci(values)
        cis.append((lo, hi))
        bar_rows.append((r.prompt, r.win_rate, lo, hi))
    overall_ci = bootstrap_ci(outcome_values(split.tuned_scores, split.base_scores, tie_band))
    bar_rows.append(("all prompts", rep.win_rate, *overall_ci))
    glo, ghi = rep.gain_ci
    acc = ""
    if "accuracy base" in rep.extra:
        acc = (f" · accuracy <b>{_fmt(rep.extra['accuracy base'])} → "
               f"{_fmt(rep.extra.get('accuracy tuned', float('nan')))}</b>")
    headline = (f"<p>Reward gain <b>{_fmt(rep.reward_gain, '+.4f')}</b> (95% CI [{_fmt(glo, '+.4f')}, "
                f"{_fmt(ghi, '+.4f')}]) · win-rate <b>{_fmt(rep.win_rate)}</b> ({rep.wins} wins / {rep.ties} ties "
                f"/ {rep.losses} losses, |Δ| &lt; {tie_band:g} is a tie) · drift <b>{_fmt(rep.drift, '.4f')}</b> "
                f"(mean absolute pixel difference from the base){acc} · {rep.seeds} seeds per prompt</p>")
    charts = (f"<div class='charts'><figure>{histogram_svg(split.base_scores, split.tuned_scores)}<figcaption>"
              f"{_esc(section.reward)} of every sample, base and tuned (same noise).</figcaption></figure>"
              f"<figure>{win_rate_bars_svg(bar_rows)}<figcaption>Win-rate of tuned over base per prompt, ties "
              "counting ½, with bootstrap 95% intervals over seeds; the dashed line is ½ (no difference). Green: "
              "the interval lies above ½, red: below.</figcaption></figure></div>")
    return (f"<h3>{_esc(rep.split)} prompts</h3>{headline}{_numbers_table(rep, cis, overall_ci)}{charts}"
            f"<h4>Samples: base over tuned, {_esc(section.reward)} under each image</h4>"
            f"{_grid_html(split, per_prompt, tie_band)}")


def render_report_html(sections: Sequence[ReportSection], meta: dict[str, Any] | None = None, *,
                       title: str = "diffalign evaluation", per_prompt: int = 8) -> str:
    """The whole page as one string (no external reference of any kind)."""
    if not sections:
        raise ValueError("render_report_html: no reward sections to show")
    meta = dict(meta or {})
    meta_line = " · ".join(f"{_esc(k)}: {_esc(v)}" for k, v in meta.items() if not isinstance(v, (dict, list)))
    body = [f"<h1>{_esc(title)}</h1>", f"<p class='meta'>{meta_line}</p>" if meta_line else ""]
    if len(sections) > 1:
        body.append("<p>Rewards: " + ", ".join(f"<a href='#reward-{k}'>{_esc(s.reward)}</a>"
                                                for k, s in enumerate(sections)) + "</p>")
    for k, section in enumerate(sections):
        body.append(f"<section id='reward-{k}'><h2>Reward: {_esc(section.reward)}</h2>")
        body += [_split_html(section, split, per_prompt) for split in section.splits]
        body.append("</section>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<link rel='icon' href='data:,'>"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def write_report_html(out_dir: str | Path, sections: Sequence[ReportSection], meta: dict[str, Any] | None = None,
                      **kwargs) -> Path:
    """Write ``report.html`` into ``out_dir`` (beside ``eval.json``), atomically: a half-written page never
    replaces a good one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_report_html(sections, meta, **kwargs), encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = ["ReportSection", "SplitResult", "render_report_html", "write_report_html", "histogram_svg",
           "win_rate_bars_svg", "image_data_uri"]
