"""report.html: its content from a run's metrics, and a headless Chromium that checks every figure loads."""
import base64
import re
import shutil
import subprocess

import pytest

from lesion_fastai.report import page, run_report, summary_report

# a 1x1 PNG, and one that is not a PNG at all (a figure a browser cannot show)
PNG = base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==')


def _froc(mean, slices=4, lesions=5):
    return {'sensitivity': {f'{r:g}': mean for r in (.5, 1, 2, 4, 8, 16)}, 'mean_0.5_4': mean, 'slices': slices, 'lesions': lesions}


def _metrics():
    split = lambda m: {'froc': _froc(m), 'mean_box_baseline': {'froc': _froc(.01)}}
    valid = {**split(.61), 'operating_point': {'score': .123, 'fp_per_slice': 1, 'fp_per_slice_reached': .98, 'sensitivity': .7}}
    return {'test': split(.52), 'valid': valid, 'config': {'freeze': 'sandwich', 'epochs': 3, 'kappa': .05}, 'train_slices': 17,
            'train_patients': 6, 'slices_per_epoch': 17, 'time_s': 12.0, 'parameters': {'trainable': 1000, 'frozen': 2000}}


def _run(tmp_path, figures=('froc.png', 'results.png', 'errors.png')):
    for f in figures: (tmp_path / f).write_bytes(PNG)
    (tmp_path / 'history.csv').write_text('epoch,train_loss,valid_loss,froc,time\n0,1.0,0.9,0.2,00:01\n1,0.5,0.6,0.4,00:01\n')
    return run_report(tmp_path, _metrics())


def test_run_report_holds_the_froc_table_published_points_operating_point_settings_and_every_figure(tmp_path):
    text = _run(tmp_path).read_text()
    assert '<td>this model, test</td>' in text and '<td>0.520</td>' in text and '<td>this model, validation</td>' in text
    assert text.count('mean box (one per slice)') == 2
    published = re.findall(r'<tr class="published"><td>([^<]*)</td>', text)
    assert published and all('published' in p for p in published)          # marked as DeepLesion's, not this data's
    assert '0.123' in text and '0.98 false positives' in text               # the operating point
    assert '<td>freeze</td><td>sandwich</td>' in text and '<td>kappa</td><td>0.05</td>' in text
    assert 'the run took 12 s' in text
    # four figures, each embedded: the three files and the training curves made from history.csv
    assert text.count('<img src="data:image/png;base64,') == 4 and (tmp_path / 'training.png').stat().st_size > 0
    assert 'src="froc.png"' not in text and 'not written' not in text


def test_a_missing_figure_is_a_note_not_a_broken_image(tmp_path):
    text = _run(tmp_path, figures=('froc.png',)).read_text()
    assert text.count('<img ') == 2 and text.count('not written') == 2      # froc + training; results and errors missing


def test_summary_report_escapes_its_text(tmp_path):
    text = summary_report(tmp_path / 'r.html', 'a <title>', 'intro & more', tables=[('t', ['a', 'b'], [['<x>', 1]])],
                          notes=['n < 1']).read_text()
    assert '<x>' not in text and '&lt;x&gt;' in text and 'intro &amp; more' in text and 'n &lt; 1' in text


CHROMIUM = next((shutil.which(c) for c in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(c)), None)


def shown_figures(html_file):
    "What the page's own check wrote after loading in headless Chromium: 'N of M'."
    dom = subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                          '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={html_file.parent / ".chromium"}',
                          '--virtual-time-budget=5000', '--dump-dom', html_file.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-figures="(\d+ of \d+)"', dom)
    assert found, f"the page's figure check did not run in Chromium; the DOM began: {dom[:300]!r}"
    return found.group(1)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; make test installs it where it can)")
def test_every_figure_of_a_run_report_loads_in_a_browser(tmp_path):
    assert shown_figures(_run(tmp_path)) == '4 of 4'


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; make test installs it where it can)")
def test_the_browser_check_counts_a_figure_that_does_not_load(tmp_path):
    bad = base64.b64encode(b'not a png').decode()
    path = page('t', [('', f'<img src="data:image/png;base64,{base64.b64encode(PNG).decode()}"><img src="data:image/png;base64,{bad}">')],
                tmp_path / 'r.html')
    assert shown_figures(path) == '1 of 2'
