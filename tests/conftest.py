"""Shared fixtures: a tiny synthetic DeepLesion-layout data set (64 px), made once per test session."""
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / 'shared'
SAMPLE = SHARED / 'fixtures' / 'DL_info_sample.csv'
TEST_SPLIT = SHARED / 'fixtures' / 'DL_info_test_split.csv'
REAL_CT = SHARED / 'realct'


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    from lesion_fastai.synthetic import generate
    root = tmp_path_factory.mktemp('synthetic') / 'data'
    generate(root, patients=10, size=64, seed=3, neighbours=1, lesions_per_slice={1: .6, 2: .3, 3: .1})   # several multi-lesion slices
    return root


@pytest.fixture(scope='session')
def tiny_records(tiny_data):
    from lesion_fastai.deeplesion import read_dl_info, slice_records
    return slice_records(read_dl_info(tiny_data / 'DL_info.csv'))


@pytest.fixture
def sample_csv():
    if not SAMPLE.exists(): pytest.skip(f"real DeepLesion sample not found at {SAMPLE} (../shared/fixtures beside the project)")
    return SAMPLE


@pytest.fixture
def test_split_csv():
    if not TEST_SPLIT.exists(): pytest.skip(f"DeepLesion's official test split rows not found at {TEST_SPLIT} (../shared/fixtures beside the project)")
    return TEST_SPLIT
