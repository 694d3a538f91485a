"""Every console script's `--help`: each argument has a text, each option says its default."""
import argparse
import configparser
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def console_scripts():
    ini = configparser.ConfigParser()
    ini.read(REPO / 'settings.ini')
    lines = [l.strip() for l in ini['DEFAULT']['console_scripts'].splitlines() if l.strip()]
    return dict(l.split('=', 1) for l in lines)


class _Parsed(Exception):
    def __init__(self, parser): self.parser = parser


def parser_of(target, monkeypatch):
    "The ArgumentParser a console script builds (caught when it parses its arguments)."
    module, func = target.split(':')
    main = getattr(importlib.import_module(module), func)

    def capture(self, *args, **kwargs): raise _Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', capture)
    with pytest.raises(_Parsed) as caught:
        main([])
    return caught.value.parser


@pytest.mark.parametrize('script', sorted(console_scripts()))
def test_every_option_has_a_text_and_its_default(script, monkeypatch):
    parser = parser_of(console_scripts()[script], monkeypatch)
    assert parser.prog == script
    assert parser.description
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = '/'.join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f'{script} {name}: no help text'
        if action.option_strings:
            text = formatter._get_help_string(action)
            assert 'default' in text.lower(), f'{script} {name}: the help does not say the default'


@pytest.mark.slow
@pytest.mark.parametrize('script', ['dwiml_train_model', 'dwiml_describe_hdf5'])
def test_help_runs_as_a_command(script):
    exe = Path(sys.executable).parent / script
    run = subprocess.run([str(exe), '--help'], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and '(default:' in run.stdout and not run.stderr.strip()
