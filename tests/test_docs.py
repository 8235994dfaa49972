"""The commands README, docs/ and the notebook show are commands the code accepts: every `--flag` they
name is a flag of one of the project's commands, and every `python -m ...` line parses, placeholders
(DATA, OUT, MODE, ...) aside, and every name their snippets import exists. A flag renamed, a choice
dropped or a function moved fails here, not in a user's shell."""
import argparse
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md')), *sorted((ROOT / 'examples').glob('*.ipynb'))]
MODULES = {'pretrain': 'pretrain.__main__', 'finetune': 'finetune.__main__', 'lesion_fastai.bench': 'lesion_fastai.bench.__main__',
           **{f'lesion_fastai.{m}': f'lesion_fastai.{m}' for m in ('convert', 'demo', 'evaluate', 'predict', 'search', 'selftrain', 'synthetic')}}
LAUNCHER = re.compile(r'(?:torchrun|accelerate launch|pip install|docker run|apt-get)\b[^`\n]*?(?= -m |`|$)', re.M)   # other tools' flags
PLACEHOLDER = re.compile(r'[A-Z][A-Z0-9_]*(?:\.\.\.)?|\.\.\.|…')                      # DATA, OUT, MODE, INPUTS..., ...


def _text(path: Path) -> str:
    if path.suffix == '.ipynb': return '\n'.join(''.join(c['source']) for c in json.loads(path.read_text())['cells'])
    return path.read_text()


def _parsers(ap):
    yield ap
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values(): yield from _parsers(sub)


class Refused(Exception): pass


def _lenient(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    "`ap` and its subcommands raising `Refused` rather than exiting, no flag required, a placeholder taken for any value."
    for p in _parsers(ap):
        def error(message, prog=p.prog): raise Refused(f'{prog}: {message}')
        def get_value(action, text, get=p._get_value): return text if PLACEHOLDER.fullmatch(text) else get(action, text)
        def check_value(action, value, check=p._check_value):
            if not (isinstance(value, str) and PLACEHOLDER.fullmatch(value)): check(action, value)
        p.error, p._get_value, p._check_value = error, get_value, check_value
        for action in p._actions:                                           # a span may show only some arguments
            action.required = False
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                action.nargs = {None: '?', '+': '*'}.get(action.nargs, action.nargs)
    return ap


def _make(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(MODULES[name]).parser()


def _help_texts():
    "(where, text) of each --help page's description, epilog and option help, every subcommand's included."
    for name in MODULES:
        for p in _parsers(_make(name)):
            yield p.prog, f'{p.description or ""}\n{p.epilog or ""}'
            yield from ((f'{p.prog} {"/".join(a.option_strings)}', a.help or '') for a in p._actions)


def _commands(text: str, examples: bool = False):
    """(module, argument list, the command as written) of each `python -m` command: in code blocks and code
    spans of markdown, or (`examples`) on lines of their own, as --help's examples are written."""
    lines, prose, fence = [], [], None
    for line in re.sub(r'\\\n\s*', ' ', text).splitlines():                  # a command continued over lines is one line
        if examples:
            if re.match(r'\s*(python|torchrun)\b', line): lines.append(line)
        elif line.startswith('```'): fence = None if fence is not None else line[3:].strip()
        elif fence in ('bash', 'sh', ''): lines.append(line)                  # a code block: a command a line
        elif fence is None: prose.append(line)
    lines += [' '.join(span.split()) for para in re.split(r'\n\s*\n', '\n'.join(prose)) for span in para.split('`')[1::2]]
    lines = [part for line in lines for part in re.split(r'\s(?:&&|\|\|?|;)\s', line)]     # one command per part
    for line in lines:
        m = re.search(r'python -m ([\w.]+)(?!\S)(.*)|(?:torchrun|accelerate launch)\b.*? -m ([\w.]+)(?!\S)(.*)', line)
        if not m or (m.group(1) or m.group(3)) not in MODULES: continue
        module, rest = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        rest = re.split(r'\s#|, then | \(|\s\d?>', rest)[0].replace('[', ' ').replace(']', ' ')   # comments, prose, > log, [optional]
        try: words = shlex.split(rest)
        except ValueError as e: raise ValueError(f'{line!r}: {e}') from None
        args = [w for i, w in enumerate(words) if w not in ('...', '…') or (i and words[i - 1].startswith('--'))]   # "and more flags"
        if module == 'lesion_fastai.bench' and args and PLACEHOLDER.fullmatch(args[0]): continue             # `bench NAME`: nothing to check
        yield module, args, line.strip()


def _documented_commands():
    texts = [(path.name, _text(path), False) for path in DOCS] + [(where, text, True) for where, text in _help_texts()]
    return [pytest.param(module, args, id=f'{where}:{line[:60]}') for where, text, examples in texts
            for module, args, line in _commands(text, examples)]


def test_the_docs_show_commands_at_all():
    found = {param.values[0] for param in _documented_commands()}
    assert set(MODULES) - {'lesion_fastai.demo'} <= found, f'no documented command for {set(MODULES) - found}'


@pytest.mark.parametrize('module,args', _documented_commands())
def test_every_documented_command_parses(module, args):
    ap = _lenient(_make(module))
    try: ap.parse_args(args)
    except SystemExit: pass                                                # --help


def test_every_flag_the_docs_and_the_help_name_is_a_flag_of_a_command():
    known = {flag for name in MODULES for p in _parsers(_make(name)) for a in p._actions for flag in a.option_strings}
    texts = [(str(path.relative_to(ROOT)), _text(path)) for path in DOCS] + list(_help_texts())
    unknown = [f'{where}:{i}: {flag}' for where, text in texts for i, line in enumerate(LAUNCHER.sub('', text).splitlines(), 1)
               for flag in re.findall(r'(?<![\w-])--[a-z][\w-]*', line) if flag not in known]
    assert not unknown, 'flags no command has:\n' + '\n'.join(unknown)


def test_every_import_the_docs_show_resolves():
    imports = [(path.name, module, name.strip()) for path in DOCS
               for module, names in re.findall(r'^[ \t]*from ((?:lesion_fastai|fastai)[\w.]*) import ([\w, ]+?)[ \t]*(?:#.*)?$', _text(path), re.M)
               for name in re.sub(r'\s+as\s+\w+', '', names).split(',')]
    assert len(imports) >= 5, imports
    missing = [f'{where}: from {module} import {name}' for where, module, name in imports
               if not hasattr(importlib.import_module(module), name)]
    assert not missing, 'names the docs import that do not exist:\n' + '\n'.join(missing)


def test_every_interval_readme_quotes_is_one_the_docs_record():
    "README summarises docs/: an interval it quotes (0.063 +- 0.032) is one a dated section there measured."
    record = ' '.join(' '.join((ROOT / 'docs' / name).read_text().split()) for name in ('results.md', 'design.md'))
    quoted = re.findall(r'[-+]?\d*\.\d+ \+- \d*\.\d+', ' '.join((ROOT / 'README.md').read_text().split()))   # lines joined
    assert len(quoted) >= 10, quoted
    held = lambda q: re.search(r'(?<![\d.+-])' + ('' if q[0] in '+-' else r'[+]?') + re.escape(q) + r'(?!\d)', record)
    unrecorded = [q for q in quoted if not held(q)]              # with its sign: -0.014 is not +0.014
    assert not unrecorded, f'README quotes intervals docs/ does not hold: {unrecorded}'
