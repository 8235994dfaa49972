"""report.html: one self-contained page per run, to open in a browser. Every figure is embedded (a
data URL), so the page can be mailed or moved alone; on load a line of script counts the figures that
decoded and writes the count into the page (`data-figures` on its body, and a line at its foot), which
is how the browser test checks them.

* `run_report`, every `finetune` run: the test and validation FROC beside the mean-box baseline and
  the published reference points (marked as DeepLesion's, not this data's), the operating point, the
  FROC curves, the training curves from history.csv, test slices (the first ones, the worst misses
  and false positives), the settings, the data counts, the machine and the run time.
* `summary_report`, the demo and `bench efficiency`: a title, tables and figures given to it.
"""
from __future__ import annotations

import base64
import html
import platform
import time
from pathlib import Path

from .files import atomic_write_text

__all__ = ['run_report', 'summary_report', 'page', 'figure_tag', 'table_html', 'markdown_table']

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .55em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-size:.85em}.published{color:#666;font-style:italic}code{background:#f5f5f5;padding:0 .2em}"""

_CHECK = """<script>window.addEventListener('load',function(){var imgs=[].slice.call(document.images);
var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0}).length;document.body.dataset.figures=ok+' of '+imgs.length;
document.getElementById('figures-check').textContent=ok+' of '+imgs.length+' figures shown';});</script>"""


def figure_tag(path: Path | str, alt: str) -> str:
    "An <img> of the PNG at `path`, embedded as a data URL (a note instead where the file is missing)."
    path = Path(path)
    if not path.is_file(): return f'<p class="note">({html.escape(alt)}: not written)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption class="note">{html.escape(alt)}</figcaption></figure>'


def table_html(header, rows, classes=None) -> str:
    "An HTML table of `header` and `rows` (each cell escaped); `classes[i]` gives row i a class."
    head = ''.join(f'<th>{html.escape(str(h))}</th>' for h in header)
    body = ''.join(f'<tr{f" class={chr(34)}{classes[i]}{chr(34)}" if classes and classes[i] else ""}>'
                   + ''.join(f'<td>{html.escape(str(c))}</td>' for c in row) + '</tr>' for i, row in enumerate(rows))
    return f'<table><tr>{head}</tr>{body}</table>'


def page(title: str, sections, path: Path | str) -> Path:
    "A self-contained HTML page of (heading, HTML) sections, with the figures check, written atomically."
    parts = [f'<h2>{html.escape(h)}</h2>\n{body}' if h else body for h, body in sections]
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style>'
           f'</head><body><h1>{html.escape(title)}</h1>\n' + '\n'.join(parts)
           + f'\n<p class="note" id="figures-check">figures not checked (no script)</p>{_CHECK}</body></html>\n')
    return atomic_write_text(path, doc)


def _machine() -> str:
    import os
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {gpu}"


def _froc_rows(metrics: dict) -> tuple[list, list, list]:
    from .froc import FP_RATES, PUBLISHED
    header = ['', *(f'{r:g} FPs' for r in FP_RATES), 'mean 0.5-4', 'slices', 'lesions']
    rows, classes = [], []
    for split in ('test', 'valid'):
        if split not in metrics: continue
        f, b = metrics[split]['froc'], metrics[split]['mean_box_baseline']['froc']
        rows.append([f'this model, {"test" if split == "test" else "validation"}', *(f"{f['sensitivity'][f'{r:g}']:.3f}" for r in FP_RATES),
                     f"{f['mean_0.5_4']:.3f}", f['slices'], f['lesions']])
        rows.append([f'mean box (one per slice), {"test" if split == "test" else "validation"}',
                     *(f"{b['sensitivity'][f'{r:g}']:.3f}" for r in FP_RATES), f"{b['mean_0.5_4']:.3f}", b['slices'], b['lesions']])
        classes += ['', '']
    for name, pts in PUBLISHED.items():
        rows.append([f'{name} (published, the real DeepLesion test split)', *(f'{p / 100:.3f}' for p in pts),
                     *([''] * (len(FP_RATES) - len(pts))), f"{sum(pts[:4]) / 400:.3f}", '4,817', '4,912'])
        classes.append('published')
    return header, rows, classes


def _history_figure(history: Path, path: Path) -> Path | None:
    "Training and validation loss and the validation FROC per epoch, from history.csv."
    import pandas as pd
    from .plots import plt, save_fig
    if not history.is_file(): return None
    h = pd.read_csv(history)
    if h.empty: return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), layout='constrained')
    a.plot(h.epoch, h.train_loss, label='training loss'); a.plot(h.epoch, h.valid_loss, label='validation loss')
    a.set_xlabel('epoch'); a.set_yscale('log'); a.grid(alpha=.3); a.legend(fontsize=8)
    if 'froc' in h:
        b.plot(h.epoch, h.froc, color='C2', marker='.', label='validation FROC, mean 0.5-4 FPs')
        b.axvline(int(h.froc.idxmax()), color='gray', ls=':', label=f'best epoch {int(h.froc.idxmax())}')
        b.set_ylim(0, 1); b.legend(fontsize=8)
    b.set_xlabel('epoch'); b.grid(alpha=.3)
    from matplotlib.ticker import MaxNLocator
    for ax in (a, b): ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_fig(fig, path)


def run_report(out: Path, metrics: dict, prefix: str = '', title: str | None = None) -> Path:
    """`out/<prefix>report.html` of a finetune run (or an --eval) from its `metrics` and the files it
    wrote beside them (module docstring)."""
    out = Path(out)
    cfg = metrics.get('config', {})
    header, rows, classes = _froc_rows(metrics)
    sections = [('', f'<p>Written {time.strftime("%Y-%m-%d %H:%M")} on {html.escape(_machine())}'
                     + (f'; the run took {metrics["time_s"]:.0f} s' if 'time_s' in metrics else '') + '.</p>'),
                ('FROC: sensitivity at false positives per slice (IoU >= 0.5)',
                 table_html(header, rows, classes) + '<p class="note">The published rows are sensitivities reported on the real '
                 "DeepLesion test split: marks of where the field stands, not results on this data.</p>")]
    op = metrics.get('valid', {}).get('operating_point')
    if op: sections.append(('Operating point', f"<p>Boxes scoring at least <b>{op['score']:.3f}</b> are drawn (here, in "
                                               f"<code>show_results</code> and <code>predict --overlays</code>): at that score the "
                                               f"model made {op['fp_per_slice_reached']:.2f} false positives per validation slice and "
                                               f"found {op['sensitivity']:.3f} of the validation lesions.</p>"))
    sections.append(('FROC curves', figure_tag(out / f'{prefix}froc.png', 'validation and test FROC curves, the mean box, published points')))
    curves = _history_figure(out / 'history.csv', out / f'{prefix}training.png') if not prefix else None
    if curves: sections.append(('Training', figure_tag(curves, 'losses and validation FROC per epoch')))
    sections.append(('Test slices', figure_tag(out / f'{prefix}results.png', 'the first test slices: lesions green, boxes yellow')
                     + figure_tag(out / f'{prefix}errors.png', 'the worst misses and false positives among the test slices')))
    counts = [['training slices (labelled)', metrics.get('train_slices', '')], ['training patients', metrics.get('train_patients', '')],
              ['slices per epoch', metrics.get('slices_per_epoch', '')]]
    for split, name in (('valid', 'validation'), ('test', 'test')):
        if split in metrics: counts += [[f'{name} slices / lesions', f"{metrics[split]['froc']['slices']} / {metrics[split]['froc']['lesions']}"]]
    if 'parameters' in metrics: counts += [['parameters trainable / frozen', f"{metrics['parameters']['trainable']:,} / {metrics['parameters']['frozen']:,}"]]
    sections.append(('Data', table_html(['', ''], counts)))
    if cfg: sections.append(('Settings', table_html(['setting', 'value'], [[k, v] for k, v in cfg.items() if v is not None])))
    return page(title or f"lesion_fastai run {out.name}", sections, out / f'{prefix}report.html')


def summary_report(path: Path | str, title: str, intro: str, tables=(), figures=(), notes=()) -> Path:
    """A page of `intro` (text), `tables` ((heading, header, rows)), `notes` (lines) and `figures`
    ((heading, path, caption)): the demo's and the benchmarks' reports."""
    sections = [('', f'<p>{html.escape(intro)}</p><p class="note">Written {time.strftime("%Y-%m-%d %H:%M")} on {html.escape(_machine())}.</p>')]
    sections += [(h, table_html(header, rows)) for h, header, rows in tables]
    if notes: sections.append(('Verdicts', '<ul>' + ''.join(f'<li>{html.escape(n)}</li>' for n in notes) + '</ul>'))
    sections += [(h, figure_tag(p, caption)) for h, p, caption in figures]
    return page(title, sections, path)


def markdown_table(text: str) -> tuple[list, list]:
    "The header and rows of a Markdown table (`| a | b |` lines, the separator line skipped)."
    lines = [l.strip() for l in text.strip().splitlines() if l.strip().startswith('|')]
    cells = lambda l: [c.strip() for c in l.strip('|').split('|')]
    return cells(lines[0]), [cells(l) for l in lines[2:]]

