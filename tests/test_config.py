"""Settings from one source: the config dataclasses check what the command line checks, and the parsers
built from them give the dataclasses' own defaults."""
import dataclasses
from pathlib import Path

import pytest

import finetune.__main__ as finetune_cli
import pretrain.__main__ as pretrain_cli
from lesion_fastai.config import FinetuneConfig, PretrainConfig, SettingError, choices, from_args


@pytest.mark.parametrize('field,value,message', [
    ('kappa', 0, '--kappa must be positive, got 0'),
    ('label_fraction', 1.5, r'--label-fraction must be in \(0, 1\], got 1.5'),
    ('bs', 0, '--bs must be at least 1, got 0'),
    ('nms_iou', 1., r'--nms must be in \(0, 1\), got 1'),
    ('adapter_ratio', 5, r'--adapter-ratio must be in \(0, 4\], got 5'),
    ('head', 'cubic', "--head 'cubic': expected one of direct, gaussian"),
    ('loss', 'iou+l1', r"--loss .*unknown term\(s\) \['iou'\]"),
    ('windows', 'soft,nowhere', "--windows unknown window 'nowhere'"),
    ('stride', 16, "--stride 16: expected one of 4, 8"),
])
def test_finetune_config_from_python_fails_as_the_command_line_does(field, value, message, tmp_path, capsys):
    with pytest.raises(SettingError, match=message): FinetuneConfig(data=tmp_path, out=tmp_path / 'o', **{field: value})
    flag = next(f for f in dataclasses.fields(FinetuneConfig) if f.name == field).metadata.get('flag') or '--' + field.replace('_', '-')
    with pytest.raises(SystemExit) as e: finetune_cli.main(['--data', str(tmp_path), flag, str(value)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and ('invalid choice' in err or __import__('re').search(message, err)), err


def test_pretrain_config_checks_its_own_fields(tmp_path):
    with pytest.raises(SettingError, match=r'--mask-ratio must be in \[0, 1\), got 1'): PretrainConfig(data=tmp_path, out=tmp_path, mask_ratio=1)
    with pytest.raises(SettingError, match='--code-channels must be 3 or 4 positive integers'): PretrainConfig(data=tmp_path, out=tmp_path, code_channels=(64, 8))
    with pytest.raises(SettingError, match="--pretext 'jigsaw'"): PretrainConfig(data=tmp_path, out=tmp_path, pretext='jigsaw')
    assert PretrainConfig(data=str(tmp_path), out=str(tmp_path), code_channels=[64, 8, 4, 4]).code_channels == (64, 8, 4, 4)


@pytest.mark.parametrize('cli,cls,out', [(finetune_cli, FinetuneConfig, 'runs/finetune'), (pretrain_cli, PretrainConfig, 'runs/pretrain')])
def test_the_command_lines_defaults_are_the_dataclasses(cli, cls, out, tmp_path):
    ap = cli.parser()
    parsed = from_args(cls, ap, ap.parse_args(['--data', str(tmp_path)]), out=Path(out))
    assert parsed == cls(data=tmp_path, out=Path(out))
    help_text = ap.format_help()
    flags = [f.metadata.get('flag') or '--' + f.name.replace('_', '-') for f in dataclasses.fields(cls) if f.metadata.get('cli')]
    assert all(flag in help_text for flag in flags)                    # every setting has its flag, documented
    hidden = [f.name for f in dataclasses.fields(cls) if not f.metadata.get('cli', True)]
    assert all('--' + n.replace('_', '-') not in help_text for n in hidden)


def test_the_old_name_of_a_freeze_mode_is_accepted_and_recorded_as_the_new_one(tmp_path):
    assert FinetuneConfig(data=tmp_path, out=tmp_path, freeze='none').freeze == 'full'
    assert 'none' not in choices(FinetuneConfig, 'freeze')
    args = finetune_cli.parser().parse_args(['--data', str(tmp_path), '--freeze', 'none'])
    assert from_args(FinetuneConfig, finetune_cli.parser(), args, out=tmp_path).freeze == 'full'


def test_context_defaults_to_two_neighbours_where_the_data_ships_them_and_says_so_where_not(tiny_records, tmp_path, capsys):
    from lesion_fastai.config import DEFAULT_CONTEXT, resolve_context
    from lesion_fastai.deeplesion import read_dl_info, slice_records
    from lesion_fastai.synthetic import generate
    assert DEFAULT_CONTEXT == 2 and resolve_context(None, tiny_records, 'tiny') == 2 and resolve_context(0, tiny_records, 'tiny') == 0
    assert capsys.readouterr().out == ''
    generate(tmp_path / 'keys', patients=4, size=32, seed=0, neighbours=0)            # key slices only
    capsys.readouterr()                                                                # its progress bar
    keys_only = slice_records(read_dl_info(tmp_path / 'keys' / 'DL_info.csv'))
    assert resolve_context(None, keys_only, tmp_path / 'keys') == 0 and resolve_context(1, keys_only, 'x') == 1
    assert capsys.readouterr().out.strip() == (f"--context: {tmp_path / 'keys'} ships no neighbour slices beside its key slices, "
                                               f"so each slice is seen alone (--context 0)")
