"""Data-parallel training in two processes on this machine's CPUs (torchrun, gloo), through the real
entry points: only rank 0 writes, the ranks split every epoch, validation gathers every slice in
order, rank 0's evaluation equals a single-process one, and a crashed run resumes exactly."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def torchrun(trace, stop_after, module, *args, check=True):
    "Two processes of `python -m MODULE ARGS` under torchrun, traced by distributed_run.py."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(ROOT / 'tests' / 'distributed_run.py'), str(trace), str(stop_after), module, *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check: assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def ranks(trace):
    return [json.loads((trace / f'rank{i}.json').read_text()) for i in (0, 1)]


def assert_disjoint_halves(trace):
    "Each epoch (each DataLoader pass) the two ranks drew disjoint halves of all items (up to fastai's padding)."
    r0, r1 = ranks(trace)
    assert r0['world_size'] == r1['world_size'] == 2 and len(r0['idxs']) == len(r1['idxs']) > 0
    for a, b in zip(r0['idxs'], r1['idxs']):
        n, i0, i1 = a['n'], a['idxs'], b['idxs']
        assert a['shuffle'] == b['shuffle'] and len(i0) == len(i1) == -(-n // 2)
        assert set(i0) | set(i1) == set(range(n))
        assert len(set(i0) & set(i1)) == n % 2          # only the one repeated to pad an odd count
    shuffled = [a['idxs'] for a in r0['idxs'] if a['shuffle']]
    assert len(shuffled) >= 2 and shuffled[0] != shuffled[1]   # a new order every epoch


def history(run):
    return pd.read_csv(run / 'history.csv').drop(columns='time')


@pytest.fixture(scope='module')
def pretrained(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('dist')
    out = tmp / 'pretrain'
    torchrun(tmp / 'trace_pretrain', -1, 'pretrain', '--data', tiny_data, '--out', out, '--epochs', 2, '--bs', 2, '--size', 32,
             '--precision', 'fp32')
    return tmp, out


def test_pretrain_in_two_processes_writes_once_from_rank_0(pretrained):
    tmp, out = pretrained
    assert len(history(out)) == 2                                  # one row per epoch, not one per rank
    assert sorted(p.name for p in (out / 'models').iterdir()) == ['best.pth']
    assert not list(out.rglob('*.tmp'))
    assert (out / 'pretrained.pth').exists() and (out / 'reconstructions.png').exists()
    assert_disjoint_halves(tmp / 'trace_pretrain')


def test_finetune_in_two_processes_evaluates_as_one_process_and_resumes_exactly(pretrained, tiny_data):
    from fastai.learner import load_learner
    from lesion_fastai.deeplesion import evaluation_records, load_data
    from lesion_fastai.evaluation import predict_detections
    from lesion_fastai.export import detector_settings
    tmp, pre = pretrained
    # float32, so that the validation FROC computed during training is the evaluation's exactly (bf16 autocast would round it)
    args = ['--data', tiny_data, '--pretrained', pre / 'pretrained.pth', '--freeze', 'sandwich', '--epochs', 3, '--bs', 2, '--precision', 'fp32']
    whole = tmp / 'whole'
    torchrun(tmp / 'trace_whole', -1, 'finetune', *args, '--out', whole)

    h = history(whole)
    assert len(h) == 3 and np.isfinite(h.train_loss).all()
    assert sorted(p.name for p in (whole / 'models').iterdir()) == ['best.pth'] and not list(whole.rglob('*.tmp'))
    assert_disjoint_halves(tmp / 'trace_whole')

    # the validation FROC of each epoch was gathered from both ranks in the records' order: the best epoch's
    # detections are exactly those of the saved model run over the validation slices in this one process
    best = int(h.froc.idxmax())
    gathered = np.load(tmp / 'trace_whole' / f'valid_detections_{best}.npz')
    learn = load_learner(whole / 'export.pkl', cpu=True)
    _, records = load_data(tiny_data)
    valid = evaluation_records(records, 'val')
    dets = predict_detections(learn.model, *detector_settings(learn), valid)
    assert gathered['boxes'].shape == dets.boxes.shape and len(dets) == len(valid)
    assert np.allclose(gathered['scores'], dets.scores, atol=1e-5) and np.allclose(gathered['boxes'], dets.boxes, atol=1e-5)

    # rank 0's metrics are those of a single-process evaluation of the exported model
    m = json.loads((whole / 'metrics.json').read_text())
    assert m['valid']['froc']['mean_0.5_4'] == pytest.approx(h.froc[best])
    r = subprocess.run([sys.executable, '-m', 'finetune', '--eval', whole / 'export.pkl', '--data', tiny_data, '--out', tmp / 'eval'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    e = json.loads((tmp / 'eval' / 'eval_metrics.json').read_text())
    assert e['test']['froc'] == m['test']['froc'] and e['test']['top1']['hit@0.5'] == m['test']['top1']['hit@0.5']

    # killed after epoch 1's resume state, then resumed in two processes: the uninterrupted run's history and weights
    cut = tmp / 'cut'
    crashed = torchrun(tmp / 'trace_cut', 0, 'finetune', *args, '--out', cut, check=False)
    assert crashed.returncode != 0 and (cut / 'last.pth').exists() and len(history(cut)) == 1
    torchrun(tmp / 'trace_resumed', -1, 'finetune', *args, '--out', cut, '--resume')
    pd.testing.assert_frame_equal(history(cut), h)
    a, b = (torch.load(run / 'models' / 'best.pth', map_location='cpu') for run in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a resume state of two processes cannot be resumed by one
    r = subprocess.run([sys.executable, '-m', 'finetune', *map(str, args), '--out', cut, '--resume'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and 'written by a run of 2 process(es)' in r.stderr
