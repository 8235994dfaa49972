"""Every row of README's bad-input table: a named error, exit status 1, and nothing written to --out."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune.__main__ as finetune_cli
import pretrain.__main__ as pretrain_cli
from lesion_fastai.config import FinetuneConfig
from lesion_fastai.deeplesion import COLUMNS, read_dl_info
from lesion_fastai.finetuning import finetune


@pytest.fixture
def data(tiny_data, tmp_path):
    "A private copy of the tiny data set, to break."
    root = tmp_path / 'data'
    shutil.copytree(tiny_data, root)
    return root


def _rows(root):
    with open(root / 'DL_info.csv', newline='') as f: return list(csv.reader(f))


def _write_rows(root, rows):
    with open(root / 'DL_info.csv', 'w', newline='') as f: csv.writer(f).writerows(rows)


def _set(root, column, value, row=0):
    rows = _rows(root)
    rows[row + 1][COLUMNS.index(column)] = value
    _write_rows(root, rows)


def _key_slice(root, split='train'):
    "(PNG path, line) of the first key slice of `split`."
    df = read_dl_info(root / 'DL_info.csv')
    r = df[df.split == split].iloc[0]
    return Path(r.image_path), int(r.line)


def _neighbour(root):
    key, line = _key_slice(root)
    return key.with_name(f'{int(key.stem) + 1:03d}.png'), line


def _truncate(p):
    p.write_bytes(p.read_bytes()[:200])


def _unwritable_dir(tmp_path):
    "A folder this process cannot write to, or None (root writes anywhere but on read-only mounts)."
    if os.geteuid() != 0:
        d = tmp_path / 'locked'
        d.mkdir()
        d.chmod(0o555)
        return d
    try:
        (Path('/sys') / '.lesion_fastai_probe').touch()
    except OSError: return Path('/sys')
    return None


# (id, entry point, how the input is broken, extra arguments, what the error must say)
CASES = [
    ('data folder missing', 'finetune', lambda root: shutil.rmtree(root), [], r'--data .*: no such folder'),
    ('DL_info.csv missing', 'finetune', lambda root: (root / 'DL_info.csv').unlink(), [],
     r'DL_info.csv: missing; .*write it to a folder of its own: python -m lesion_fastai.synthetic --out data/synthetic'),
    ('row with 3 box numbers', 'finetune', lambda root: _set(root, 'Bounding_boxes', '1, 2, 3', row=4), [],
     r'DL_info.csv line 6: Bounding_boxes has 3 numbers, expected 4'),
    ('key slice missing', 'finetune', lambda root: _key_slice(root)[0].unlink(), [],
     r'key slice\(s\) named in .*DL_info.csv are missing, first .*\.png \(DL_info.csv line \d+\)'),
    ('key slice empty (0 bytes)', 'finetune', lambda root: _key_slice(root)[0].write_bytes(b''), [],
     r'\.png: empty file \(0 bytes\).*\(key slice of DL_info.csv line \d+\)'),
    ('key slice random bytes', 'finetune', lambda root: _key_slice(root)[0].write_bytes(np.random.default_rng(0).bytes(3000)), [],
     r'\.png: not an image file .*\(key slice of DL_info.csv line \d+\)'),
    ('key slice truncated', 'finetune', lambda root: _truncate(_key_slice(root)[0]), [],
     r'\.png: corrupt or truncated image data .*\(key slice of DL_info.csv line \d+\)'),
    ('key slice 8-bit', 'finetune', lambda root: Image.new('L', (64, 64)).save(_key_slice(root)[0]), [],
     r"\.png: PNG mode 'L', expected a 16-bit single-channel DeepLesion slice"),
    ('key slice RGB', 'finetune', lambda root: Image.new('RGB', (64, 64)).save(_key_slice(root, 'test')[0]), [],
     r"\.png: PNG mode 'RGB', expected a 16-bit"),
    ('neighbour slice truncated (--context 1)', 'finetune', lambda root: _truncate(_neighbour(root)[0]), ['--context', '1'],
     r'/(\d+)\.png: corrupt or truncated image data .*\(neighbour slice needed by the key slice \d+\.png of DL_info.csv line \d+\)'),
    ('Image_size disagrees with the file', 'finetune', lambda root: _set(root, 'Image_size', '512, 512'), [],
     r'64 x 64 pixels, but Image_size in DL_info.csv line 2 says 512 x 512'),
    ('a slice broken, cache none', 'finetune', lambda root: _truncate(_key_slice(root)[0]), ['--cache', 'none'],
     r'corrupt or truncated image data'),
    ('a slice broken, cache disk', 'finetune', lambda root: _truncate(_key_slice(root)[0]), ['--cache', 'disk'],
     r'corrupt or truncated image data'),
    ('a slice broken, pretraining', 'pretrain', lambda root: _truncate(_neighbour(root)[0]), [], r'corrupt or truncated image data'),
    ('fewer training slices than --bs', 'finetune', None, ['--label-fraction', '0.1', '--bs', '4'],
     r'--label-fraction 0.1 leaves 1 patient\(s\): \d training slice\(s\), fewer than --bs 4'),
    ('no validation patients, pretraining', 'pretrain', lambda root: _write_rows(root, [[c if c != '2' or i != 17 else '1' for i, c in enumerate(r)] for r in _rows(root)]),
     [], r'no validation patients \(Train_Val_Test = 2\)'),
    ('no validation slices, fine-tuning', 'finetune', lambda root: _write_rows(root, [[c if c != '2' or i != 17 else '1' for i, c in enumerate(r)] for r in _rows(root)]),
     [], r'needs train \(Train_Val_Test 1\), validation \(2\) and test \(3\) slices .* it has \d+, 0 and \d+'),
    ('--out is a file', 'finetune', 'out-file', [], r'--out .* is a file, expected a folder'),
    ('--out not writable', 'finetune', 'out-locked', [], r'--out .* is not writable by this user'),
    ('--pretrained not a checkpoint', 'finetune', 'bad-ckpt', [], r'not a lesion_fastai pretrained checkpoint'),
]
CASES += [(f'--precision bf16 without a GPU or bf16 units, {e}', e, 'no-bf16', ['--precision', 'bf16'],
           r'--precision bf16 needs a CUDA GPU or a CPU with bfloat16 units') for e in ('finetune', 'pretrain')]
CASES += [(f'--cache memory larger than the memory, {e}', e, 'no-memory', [],
           r'--cache memory: the [\d,]+ slices this run prepares take about [\d.]+ GB of memory and 0.0 GB are available: '
           r'use --cache disk') for e in ('finetune', 'pretrain')]


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_writes_nothing(case, data, tmp_path, capsys, monkeypatch):
    name, entry, breaker, args, message = case
    out = tmp_path / 'runs' / 'out'
    if breaker == 'out-file':
        out.parent.mkdir(); out.write_text('not a folder')
    elif breaker == 'out-locked':
        locked = _unwritable_dir(tmp_path)
        if locked is None: pytest.skip('no folder here is unwritable to this user')
        out = locked / 'out'
    elif breaker == 'no-bf16':                   # a machine without them, whatever this one has
        import lesion_fastai.fit as fit
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
        monkeypatch.setattr(fit, 'cpu_has_bf16', lambda: False)
    elif breaker == 'no-memory':                 # DeepLesion's 930k slices against a machine's RAM, in miniature
        import lesion_fastai.cache as cache
        monkeypatch.setattr(cache, 'available_memory', lambda: 1000)
    elif breaker == 'bad-ckpt':
        torch.save({'weights': 1}, tmp_path / 'other.pth')
        args = ['--pretrained', str(tmp_path / 'other.pth')]
    elif breaker is not None: breaker(data)
    before = sorted(p.name for p in tmp_path.iterdir())
    main = finetune_cli.main if entry == 'finetune' else pretrain_cli.main
    with pytest.raises(SystemExit) as e:
        main(['--data', str(data), '--out', str(out), '--epochs', '1', '--bs', str(2), '--size', '32', *args])
    assert isinstance(e.value.code, str) and e.value.code.startswith('error: ')       # exit status 1, one line of cause
    import re
    assert re.search(message, e.value.code), e.value.code
    if breaker not in ('out-file', 'out-locked'): assert not out.exists() and not out.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before                      # nothing new beside it either


def test_bad_input_exit_status_is_1_without_traceback(data, tmp_path):
    _truncate(_key_slice(data)[0])
    r = subprocess.run([sys.executable, '-m', 'finetune', '--data', str(data), '--out', str(tmp_path / 'o'), '--size', '32', '--bs', '2'],
                       capture_output=True, text=True)
    assert r.returncode == 1 and 'Traceback' not in r.stderr and 'corrupt or truncated image data' in r.stderr
    assert not (tmp_path / 'o').exists()


@pytest.mark.slow
def test_a_run_whose_loss_is_not_finite_stops_naming_epoch_and_batch(data, tmp_path, monkeypatch):
    from lesion_fastai.models.detector import Detector
    calls = []
    real = Detector.forward

    def nan_on_third(self, x):                       # one forward per training batch: the third batch goes wrong
        calls.append(1)
        out = real(self, x)
        return (out[0] * float('nan'), *out[1:]) if len(calls) == 3 else out
    monkeypatch.setattr(Detector, 'forward', nan_on_third)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        finetune_cli.main(['--data', str(data), '--out', str(out), '--epochs', '2', '--bs', '2', '--size', '32'])
    assert 'training loss is nan at epoch 1 of 2, training batch 3 of' in e.value.code
    assert not out.exists()                  # it stopped in its first epoch: nothing worth keeping, nothing exported


@pytest.mark.parametrize('command', ['evaluate', 'finetune --eval'])
def test_eval_of_a_missing_or_foreign_model(command, data, tmp_path):
    from lesion_fastai import evaluate
    run = (lambda model, *rest: evaluate.main([model, *rest])) if command == 'evaluate' else \
          (lambda model, *rest: finetune_cli.main(['--eval', model, *rest]))
    with pytest.raises(SystemExit, match=r'error: .*missing.pkl: no such exported model'):
        run(str(tmp_path / 'missing.pkl'), '--data', str(data))
    (tmp_path / 'foreign.pkl').write_bytes(b'not a pickle')
    with pytest.raises(SystemExit, match=r'error: .*foreign.pkl: not a learner exported by finetune'):
        run(str(tmp_path / 'foreign.pkl'), '--data', str(data), '--out', str(tmp_path / 'e'))
    assert not (tmp_path / 'e').exists()


# --- --skip-unreadable: NIH's release ships two broken PNGs --------------------------------------------------------

def test_the_strict_error_names_skip_unreadable(data, tmp_path):
    _truncate(_neighbour(data)[0])
    with pytest.raises(SystemExit) as e:
        finetune_cli.main(['--data', str(data), '--out', str(tmp_path / 'out'), '--context', '1', '--size', '32', '--bs', '2'])
    assert 'corrupt or truncated image data' in e.value.code and '--skip-unreadable' in e.value.code


@pytest.mark.slow
def test_skip_unreadable_replaces_neighbours_and_drops_key_slices_in_finetune_evaluate_and_selftrain(data, tmp_path, caplog):
    from lesion_fastai import evaluate
    from lesion_fastai.cache import find_unreadable
    from lesion_fastai.deeplesion import context_paths, evaluation_records, load_data, slice_records
    from lesion_fastai.selftrain import pseudo_labels_from
    records = slice_records(read_dl_info(data / 'DL_info.csv'))
    neighbour, line = _neighbour(data)
    key = neighbour.with_name(f'{int(neighbour.stem) - 1:03d}.png')
    broken_key, _ = _key_slice(data, 'test')
    keys = {Path(r.image_path) for r in records}
    # a neighbour of every other test key slice too, so that every figure of the test split reads around one
    test_neighbours = {Path(r.image_path).with_name(f'{int(Path(r.image_path).stem) + 1:03d}.png') for r in records if r.split == 'test'}
    test_neighbours = {p for p in test_neighbours if p.exists() and p not in keys}
    for p in (neighbour, broken_key, *test_neighbours): _truncate(p)
    missing_key, _ = _key_slice(data, 'val')
    missing_key.unlink()                                             # a partial download
    broken = {neighbour, broken_key, missing_key, *test_neighbours}
    absent, problems = find_unreadable(records, 1)
    assert absent == {str(p) for p in broken} and len(problems) == len(broken) and test_neighbours
    assert any(str(neighbour) in p and f'DL_info.csv line {line}' in p for p in problems)
    assert context_paths(key, 1, absent)[2] == key and context_paths(key, 1)[2] == neighbour   # the nearest readable: the key itself
    out = tmp_path / 'out'
    res = finetune(FinetuneConfig(data=data, out=out, epochs=1, bs=2, size=32, context=1, skip_unreadable=True))
    every = load_data(data, missing_ok=True)[1]
    assert res['test']['froc']['slices'] == len(evaluation_records(every, 'test')) - 1        # left out with its lesions
    assert res['valid']['froc']['slices'] == len(evaluation_records(every, 'val')) - 1
    warned = '\n'.join(r.getMessage() for r in caplog.records if r.levelname == 'WARNING')
    assert f'--skip-unreadable: {len(broken)} slice file(s) cannot be read and are left out, 2 of the run' in warned
    assert all(str(p) in warned for p in broken)
    assert 'the key slices left out, with their lesions' in warned and warned.count('DL_info.csv line') >= len(broken) + 2
    assert json.loads((out / 'run_config.json').read_text())['skip_unreadable'] is True
    # evaluate: refused without the flag, the same test slices scored with it
    with pytest.raises(SystemExit) as e: evaluate.main([str(out / 'export.pkl'), '--data', str(data), '--out', str(tmp_path / 'e1')])
    assert str(missing_key) in e.value.code and not (tmp_path / 'e1').exists()
    evaluate.main([str(out / 'model.safetensors'), '--data', str(data), '--out', str(tmp_path / 'e2'), '--skip-unreadable'])
    assert json.loads((tmp_path / 'e2' / 'eval_metrics.json').read_text())['test'] == json.loads((out / 'metrics.json').read_text())['test']
    # self-training's teacher pass leaves the broken training slice out of the slices it pseudo-labels
    cfg = FinetuneConfig(data=data, out=tmp_path / 's', epochs=1, bs=2, size=32, context=1, skip_unreadable=True)
    found = pseudo_labels_from(out / 'export.pkl', cfg, tmp_path / 'pseudo.csv', fp=1.)
    assert neighbour in _train_slices(data) and found['unlabelled_slices'] == len([p for p in _train_slices(data) if p not in keys]) - 1


def _train_slices(root):
    from lesion_fastai.deeplesion import list_slices
    df = read_dl_info(root / 'DL_info.csv')
    return list_slices(root, set(df.patient[df.split == 'train']))


@pytest.mark.slow
@pytest.mark.parametrize('cache', ['disk', 'none'])
def test_pretrain_skips_unreadable_slices_with_every_cache(data, tmp_path, cache, caplog):
    from lesion_fastai.deeplesion import list_slices
    neighbour, _ = _neighbour(data)
    _truncate(neighbour)
    args = ['--data', str(data), '--out', str(tmp_path / 'out'), '--epochs', '1', '--bs', '2', '--size', '32', '--cache', cache,
            '--cache-dir', str(tmp_path / 'cache'), '--skip-unreadable']
    pretrain_cli.main(args)
    metrics = json.loads((tmp_path / 'out' / 'pretrain_metrics.json').read_text())
    warned = '\n'.join(r.getMessage() for r in caplog.records if r.levelname == 'WARNING')
    assert f'--skip-unreadable: 1 slice file(s) cannot be read' in warned and str(neighbour) in warned
    df = read_dl_info(data / 'DL_info.csv')
    train = [p for p in list_slices(data, set(df.patient[df.split == 'train']))]
    assert neighbour in train and metrics['config']['train_slices'] == len(train) - 1      # every slice but the broken one
