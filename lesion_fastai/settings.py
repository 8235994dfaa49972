"""How a settings dataclass becomes a command line, with nothing but the standard library (so that
`synthetic` and `convert` start without loading torch): `option` declares a field with its default,
help, allowed values and bounds; `check_fields` checks an instance (a dataclass's `__post_init__`
calls it, so a bad value fails from Python as on the command line); `add_settings` adds the fields'
flags to a parser and `from_args` builds the dataclass from the parsed flags; `recorded` is what a run
writes down of its settings and `settings_diff` how two runs' settings are compared. `config.py`
declares the runs' settings with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, field
from pathlib import Path

__all__ = ['SettingError', 'option', 'flag_of', 'check_fields', 'parse_ints', 'parse_floats', 'recorded', 'settings_diff', 'choices',
           'add_settings', 'from_args']


class SettingError(ValueError):
    "A setting outside the values it allows; on the command line, argparse's usage error."


def option(default=MISSING, help: str = '', *, flag: str | None = None, choices=None, aliases: dict | None = None,
           at_least=None, above=None, at_most=None, below=None, parse=None, check=None, metavar: str | None = None,
           default_help: str | None = None, cli: bool = True, group: str = 'run', mutex: str | None = None, nargs=None,
           unrecorded=MISSING):
    """A config field with what its command-line flag needs: `help` (the default is appended unless
    `default_help` says it in words), `flag` (default --name-with-dashes), allowed `choices` (with
    `aliases`: old names accepted for new ones), bounds (`at_least`, `above`, `at_most`, `below`),
    `parse` (text -> value, for tuples), `check` (value -> message or None, for what bounds cannot
    say), `nargs` (argparse's, for a flag taking several values). `cli=False` keeps a field out of the
    parsers (set from Python only). `unrecorded`: what a run recorded before the field existed was made
    with, where that is not the default, or a function of that run's record saying it (`settings_diff`)."""
    meta = dict(help=help, flag=flag, choices=choices, aliases=aliases or {}, at_least=at_least, above=above, at_most=at_most,
                below=below, parse=parse, check=check, metavar=metavar, default_help=default_help, cli=cli, group=group, mutex=mutex, nargs=nargs,
                unrecorded=unrecorded)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get('flag') or '--' + f.name.replace('_', '-')


def _bounds(m: dict) -> str | None:
    "The allowed range in words: 'at least 1', 'positive', 'in (0, 1]'."
    lo = ('(', m['above']) if m['above'] is not None else ('[', m['at_least']) if m['at_least'] is not None else None
    hi = (')', m['below']) if m['below'] is not None else (']', m['at_most']) if m['at_most'] is not None else None
    if lo and hi: return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo: return f"at least {lo[1]:g}" if lo[0] == '[' else 'positive' if lo[1] == 0 else f"greater than {lo[1]:g}"
    if hi: return f"at most {hi[1]:g}" if hi[0] == ']' else f"less than {hi[1]:g}"
    return None


def _out_of_bounds(m: dict, v) -> bool:
    return ((m['at_least'] is not None and v < m['at_least']) or (m['above'] is not None and v <= m['above'])
            or (m['at_most'] is not None and v > m['at_most']) or (m['below'] is not None and v >= m['below']))


def check_fields(cfg) -> None:
    "Each field against its choices, bounds and check; aliases are replaced by the names they stand for."
    for f in dataclasses.fields(cfg):
        m, v = f.metadata, getattr(cfg, f.name)
        if not m or v is None: continue
        if m['aliases'] and v in m['aliases']:
            v = m['aliases'][v]
            object.__setattr__(cfg, f.name, v)
        if m['choices'] is not None and v not in m['choices']:
            raise SettingError(f"{flag_of(f)} {v!r}: expected one of {', '.join(map(str, m['choices']))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and _out_of_bounds(m, v):
            raise SettingError(f"{flag_of(f)} must be {_bounds(m)}, got {v:g}")
        problem = m['check'](v) if m['check'] else None
        if problem: raise SettingError(f"{flag_of(f)} {problem}")


def parse_ints(text: str) -> tuple[int, ...]:
    "'64,8,4' -> (64, 8, 4)."
    try: return tuple(int(c) for c in str(text).split(',') if c.strip())
    except ValueError: raise argparse.ArgumentTypeError(f"{text!r} is not integers joined by commas") from None


def parse_floats(text: str) -> tuple[float, ...]:
    "'0.02,0.1,1' -> (0.02, 0.1, 1.0)."
    try: return tuple(float(c) for c in str(text).split(',') if c.strip())
    except ValueError: raise argparse.ArgumentTypeError(f"{text!r} is not numbers joined by commas") from None


def recorded(cfg) -> dict:
    "A config's settings as JSON records them (`metrics.json`, `run_config.json`, a checkpoint): paths as text, tuples as lists."
    text = lambda v: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return {k: text(v) for k, v in dataclasses.asdict(cfg).items()}


def _as_text(v) -> str:
    "A setting compared as text: a path, a tuple and the list JSON read back alike."
    return ','.join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def settings_diff(before: dict, now: dict, ignore=(), cls=None) -> dict:
    """The settings in which two runs differ, {name: (before's, now's)}: how `--resume` and the
    benchmarks tell a run that may be continued or reused from one made otherwise. `before` is a
    run's record (`recorded`); names in `ignore` are not compared. With the config class `cls`, a
    setting the record lacks (added since the run) counts as what runs were made with before it (its
    `unrecorded` value, else its default), and an old name of a value (`--freeze none`) as the name it
    stands for."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}

    def then(k):
        f = fields.get(k)
        if k not in before:
            if f is None: return None
            was = f.metadata.get('unrecorded', MISSING)
            if callable(was): was = was(before)
            return was if was is not MISSING else None if f.default is MISSING else f.default
        v = before[k]
        return f.metadata.get('aliases', {}).get(v, v) if f is not None and isinstance(v, str) else v
    return {k: (then(k), now.get(k)) for k in sorted(set(before) | set(now)) if k not in ignore and _as_text(then(k)) != _as_text(now.get(k))}


def choices(cls, name: str) -> tuple:
    "The values a field of a config class allows."
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata['choices']


def _help(f: dataclasses.Field) -> str:
    m = f.metadata
    if m['default_help'] is not None: return f"{m['help']} (default {m['default_help']})"
    if f.default is MISSING or f.default is False or (m['flag'] or '').startswith('--no-'): return m['help']
    shown = ','.join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    return f"{m['help']} (default {shown})"


def add_settings(ap: argparse.ArgumentParser, cls, names=None, defaults: dict | None = None, shown: dict | None = None,
                 required=('data',)) -> None:
    """Add the flags of `cls`'s fields (those in `names`, default every field with a flag) to `ap`,
    in argument groups; `defaults` replace a field's default on the command line (`shown` says one in
    words in the help); `required` fields must be given."""
    defaults, shown = defaults or {}, shown or {}
    hints = typing.get_type_hints(cls)
    groups, mutex = {}, {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get('cli') or (names is not None and f.name not in names): continue
        g = groups.get(m['group']) or groups.setdefault(m['group'], ap.add_argument_group(f"{m['group']} settings"))
        if m['mutex']: g = mutex.get(m['mutex']) or mutex.setdefault(m['mutex'], g.add_mutually_exclusive_group())
        kind = hints[f.name]
        default = defaults.get(f.name, f.default)
        kw = dict(dest=f.name, help=_help(f) if f.name not in defaults else f"{m['help']} (default {shown.get(f.name, default)})")
        if kind is bool:
            g.add_argument(flag_of(f), action='store_false' if default is True else 'store_true', **kw)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind) if typing.get_origin(kind) else kind
        parse = m['parse'] or (base if base in (int, float, Path) else str)
        choices_ = None if m['aliases'] or m['choices'] is None else m['choices']
        if m['aliases'] and m['choices']: kw['metavar'] = '{' + ','.join(m['choices']) + '}'
        if m['metavar']: kw['metavar'] = m['metavar']
        if m.get('nargs'): kw['nargs'] = m['nargs']
        g.add_argument(flag_of(f), type=parse, choices=choices_, default=None if default is MISSING else default,
                       required=f.name in required and default is MISSING, **kw)


def from_args(cls, ap: argparse.ArgumentParser, args: argparse.Namespace, **extra):
    """`cls` from parsed flags (and `extra` fields); a value out of range is argparse's usage error,
    naming the flag (exit status 2)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    try: return cls(**{**given, **extra})
    except SettingError as e: ap.error(str(e))
