"""Settings from one source: the config dataclasses check what the command line checks, and the parsers
built from them give the dataclasses' own defaults."""
import argparse
import dataclasses
import functools
import importlib
import inspect
import re
from pathlib import Path

import pytest

import finetune.__main__ as finetune_cli
import pretrain.__main__ as pretrain_cli
from lesion_fastai import config
from lesion_fastai.config import FinetuneConfig, PretrainConfig, SettingError, add_settings, choices, from_args, parse_floats, parse_ints


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


def test_a_flag_that_turns_a_default_off_says_so(tmp_path):
    "--no-adapter-gate, --no-decoder-skips and --no-augment turn their settings off; the bare names are not flags."
    ap = finetune_cli.parser()
    cfg = from_args(FinetuneConfig, ap, ap.parse_args(['--data', str(tmp_path), '--no-adapter-gate', '--no-augment', '--no-decoder-skips']),
                    out=tmp_path)
    assert cfg.adapter_gate is False and cfg.augment is False and cfg.decoder_skips is False
    assert FinetuneConfig(data=tmp_path, out=tmp_path).adapter_gate is True and FinetuneConfig(data=tmp_path, out=tmp_path).decoder_skips is True
    with pytest.raises(SystemExit): ap.parse_args(['--data', str(tmp_path), '--adapter-gate'])


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


# --- every command's flags from one source ---------------------------------------------------------

COMMANDS = ['pretrain.__main__', 'finetune.__main__', 'lesion_fastai.demo', 'lesion_fastai.search', 'lesion_fastai.selftrain',
            'lesion_fastai.convert', 'lesion_fastai.synthetic', 'lesion_fastai.predict', 'lesion_fastai.evaluate',
            'lesion_fastai.bench.__main__']
# flags no settings field holds, (command, dest): why
HAND_WRITTEN = {('finetune.__main__', 'eval'): "python -m lesion_fastai.evaluate's MODEL (EvaluateConfig.model, a positional there), under another name"}


def _command_parser(module_name: str):
    module = importlib.import_module(module_name)
    assert hasattr(module, 'parser'), f"{module_name} has no parser(): its flags cannot be checked"
    return module, module.parser()


def _parsers(ap, name: str):
    "(name, parser) of `ap` and of each of its subcommands."
    yield name, ap
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items(): yield from _parsers(sub, f'{name} {sub_name}')


def _settings_classes(module) -> list:
    "The dataclasses of `option` fields a command's flags may come from: config's, the command's, those of the modules it names."
    spaces = [config, module, *(v for v in vars(module).values() if inspect.ismodule(v) and v.__name__.startswith('lesion_fastai.'))]
    found = []
    for space in spaces:
        for v in vars(space).values():
            if (isinstance(v, type) and dataclasses.is_dataclass(v) and v not in found
                    and any('cli' in f.metadata for f in dataclasses.fields(v))): found.append(v)
    return found


@functools.lru_cache(maxsize=None)
def _as_add_settings_makes_it(cls, name: str) -> argparse.Action:
    ap = argparse.ArgumentParser(add_help=False)
    add_settings(ap, cls, names=[name], required=())
    return ap._actions[0]


def _made_from(cls, action) -> bool:
    """Whether `add_settings` makes `action` from the field of `cls` named `action.dest`: the same flag,
    choices and help, and the field's default or one it was given (`defaults=`) that the help states."""
    f = {f.name: f for f in dataclasses.fields(cls)}.get(action.dest)
    if f is None or not f.metadata.get('cli'): return False
    own = _as_add_settings_makes_it(cls, f.name)
    if own.option_strings != action.option_strings or own.choices != action.choices: return False
    if (own.default, own.help) == (action.default, action.help): return True
    as_typed = isinstance(action.default, str) and isinstance(own.default, tuple) and action.type(action.default) == own.default
    if action.help == f.metadata['help'] and (action.default == own.default or as_typed): return True    # the formatter states the default
    said = (action.help or '').removeprefix(f.metadata['help'])
    return action.help != own.help and action.help.startswith(f.metadata['help']) and said.startswith(' (default ')


EXAMPLES = {'setting': 'kappa'}     # a required value a check (not choices or a type) limits: bench select's fine-tuning setting


def _required_argv(ap, root: Path) -> list[str]:
    "Values for what `ap` requires: its positionals and required flags."
    argv = []
    for a in ap._actions:
        if a.option_strings and not a.required: continue
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)): continue
        value = EXAMPLES.get(a.dest) or str(next(iter(a.choices))) if a.dest in EXAMPLES or a.choices else '1' if a.type in (int, float, parse_floats, parse_ints) else str(root / a.dest)
        argv += a.option_strings[:1] + [value]
    return argv


@pytest.mark.parametrize('module_name', COMMANDS)
def test_every_flag_of_every_command_is_a_documented_settings_field_with_its_default(module_name, tmp_path):
    """Each optional flag of each command (and subcommand) has help and is a field of a settings dataclass
    (config's or the command's own) made by `add_settings`, so its default is the field's, or one the help
    states; the parsed defaults build those dataclasses unchanged."""
    module, ap = _command_parser(module_name)
    classes = _settings_classes(module)
    flags = set()
    for name, p in _parsers(ap, module_name):
        optional = [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        for a in optional: assert (a.help or '').strip(), f"{name}: {a.option_strings[0]} has no help"
        by_class, left = {}, [a for a in optional if (module_name, a.dest) not in HAND_WRITTEN]
        while left:                          # the classes making most of the flags first: pretrain's --data is PretrainConfig's
            cls = max(classes, key=lambda c: sum(_made_from(c, a) for a in left))
            made = [a for a in left if _made_from(cls, a)]
            if not made: break
            by_class[cls], left = made, [a for a in left if a not in made]
        assert not left, f"{name}: " + '; '.join(f"{a.option_strings[0]} (dest {a.dest}, default {a.default!r}) is no settings field's "
                                                 f"flag as add_settings makes it" for a in left)
        flags |= {a.dest for a in optional}
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions): continue
        args = p.parse_args(_required_argv(p, tmp_path))
        for cls in by_class:                 # the defaults pass the dataclass's checks and come out as parsed
            fields = [f for f in dataclasses.fields(cls) if hasattr(args, f.name)]
            unset = {f.name: tmp_path / f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING and getattr(args, f.name, None) is None}
            cfg = from_args(cls, p, args, **unset)
            assert {f.name: getattr(cfg, f.name) for f in fields if f.name not in unset} == \
                   {f.name: getattr(args, f.name) for f in fields if f.name not in unset}, f"{name}: {cls.__name__}"
    own = [c for c in classes if c.__module__ == module.__name__]
    for cls in own:                          # and the command's own settings are all on its command line
        missing = [f.name for f in dataclasses.fields(cls) if f.metadata.get('cli') and f.name not in flags]
        assert not missing, f"{module_name}: {cls.__name__} fields without a flag: {missing}"


def test_a_hand_written_flag_is_caught(tmp_path, monkeypatch):
    import lesion_fastai.synthetic as synthetic
    made = synthetic.parser

    def with_foo():
        ap = made()
        ap.add_argument('--foo', type=int, default=3, help='a number')
        return ap
    monkeypatch.setattr(synthetic, 'parser', with_foo)
    with pytest.raises(AssertionError, match=r"--foo \(dest foo, default 3\) is no settings field's flag"):
        test_every_flag_of_every_command_is_a_documented_settings_field_with_its_default('lesion_fastai.synthetic', tmp_path)


@pytest.mark.parametrize('module_name,cls_name,values,argv,message', [
    ('lesion_fastai.demo', 'DemoSettings', dict(finetune_epochs=0), ['--finetune-epochs', '0'], '--finetune-epochs must be at least 1, got 0'),
    ('lesion_fastai.demo', 'DemoSettings', dict(size=16), ['--size', '16'], '--size must be at least 32, got 16'),
    ('lesion_fastai.demo', 'DemoSettings', dict(precision='fp16'), ['--precision', 'fp16'], "--precision 'fp16': expected one of auto"),
    ('lesion_fastai.search', 'SearchSettings', dict(trials=0), ['--data', 'x', '--trials', '0'], '--trials must be at least 1, got 0'),
    ('lesion_fastai.search', 'SearchSettings', dict(max_epochs=0), ['--data', 'x', '--max-epochs', '0'], '--max-epochs must be at least 1, got 0'),
    ('lesion_fastai.selftrain', 'SelftrainSettings', dict(rounds=0), ['--data', 'x', '--rounds', '0'], '--rounds must be at least 1, got 0'),
    ('lesion_fastai.selftrain', 'SelftrainSettings', dict(pseudo_fp=0), ['--data', 'x', '--pseudo-fp', '0'], '--pseudo-fp must be positive, got 0'),
    ('lesion_fastai.convert', 'ConvertSettings', dict(pad_px=0), ['--pad-px', '0'], '--pad-px must be at least 1, got 0'),
    ('lesion_fastai.convert', 'ConvertSettings', dict(min_diameter_mm=-1), ['--min-diameter-mm', '-1'], '--min-diameter-mm must be at least 0, got -1'),
    ('lesion_fastai.convert', 'ConvertSettings', dict(label_values=(0, 2)), ['--label-values', '0,2'], r'--label-values must be above 0 \(0 is background\)'),
    ('lesion_fastai.convert', 'ConvertSettings', dict(label_values=()), ['--label-values', ','], '--label-values names no value'),
    ('lesion_fastai.convert', 'ConvertSettings', dict(window=(275, -175)), ['--window=275,-175'], '--window 275,-175: expected LOW < HIGH'),
    ('lesion_fastai.convert', 'ConvertSettings', dict(label_values=(1, 2), organ_values=(1,)), ['--label-values', '1,2', '--organ-values', '1'],
     '--label-values and --organ-values share a value'),
    ('lesion_fastai.synthetic', 'SyntheticSettings', dict(patients=2), ['--patients', '2'], '--patients must be at least 3, got 2'),
    ('lesion_fastai.synthetic', 'SyntheticSettings', dict(noisy=1.5), ['--noisy', '1.5'], r'--noisy must be in \[0, 1\], got 1.5'),
])
def test_a_commands_own_settings_fail_from_python_as_on_its_command_line(module_name, cls_name, values, argv, message, tmp_path, capsys):
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    required = {f.name: tmp_path / f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    with pytest.raises(SettingError, match=message): cls(**required, **values)
    with pytest.raises(SystemExit) as e: module.main(_required_argv(module.parser(), tmp_path) + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ('invalid choice' in err or re.search(message, err)), err      # argparse checks choices first


@pytest.mark.parametrize('module_name,function', [('lesion_fastai.search', 'search'), ('lesion_fastai.selftrain', 'self_train'),
                                                  ('lesion_fastai.synthetic', 'generate')])
def test_the_python_functions_defaults_are_their_commands(module_name, function):
    "A command's function called from Python without a setting gets the command line's default."
    module = importlib.import_module(module_name)
    defaults = {a.dest: a.default for a in module.parser()._actions}
    shared = {k: p.default for k, p in inspect.signature(getattr(module, function)).parameters.items()
              if p.default is not inspect.Parameter.empty and k in defaults}
    assert shared and shared == {k: defaults[k] for k in shared}
