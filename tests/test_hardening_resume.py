"""Data never chooses code: a checkpoint's class names are looked up among loaded classes, never imported."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dwiml_nb.trainer import experiment_paths

from dwiml_nb.testing import make_toy_trainer  # noqa: E402

BIN = Path(sys.executable).parent
RESUME = BIN / 'dwiml_resume_training_from_checkpoint'
# Modules that do something when imported (open a browser, print, run commands).
CRAFTED = ['antigravity:Foo', 'this:x', '__hello__:x', '__phello__:x', 'subprocess:Popen', 'os:system',
           'no_such_module_here:Model']


@pytest.fixture(scope='module')
def toy_experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp('exps')
    make_toy_trainer(path, 'exp', max_epochs=1).train_and_validate()
    return path


def _env():
    # BROWSER=true: should antigravity ever be imported, it opens nothing.
    return {**os.environ, 'BROWSER': 'true'}


def _crafted(tmp_path, toy_experiment, field, value):
    ckpt_file = experiment_paths(toy_experiment, 'exp')['checkpoint']
    ckpt = torch.load(ckpt_file, weights_only=True)
    ckpt[field] = value
    ckpt['model_params'] = {'args': ['touch', str(tmp_path / 'pwned')]}
    out = experiment_paths(tmp_path, 'exp')['checkpoint']
    out.parent.mkdir(parents=True)
    torch.save(ckpt, out)
    return out


@pytest.mark.slow
def test_resume_never_imports_a_module_the_checkpoint_names(tmp_path, toy_experiment):
    cases = [(field, value) for field in ('trainer_class', 'model_class') for value in CRAFTED]
    for i, (field, value) in enumerate(cases):
        _crafted(tmp_path / str(i), toy_experiment, field, value)
    # Every resume in one fresh interpreter: which modules are loaded afterwards?
    script = (f'import sys, json\nfrom dwiml_nb.trainer import resume_main\ncodes = []\n'
              f'for i in range({len(cases)}):\n'
              f'    try:\n        resume_main([{str(tmp_path)!r} + "/" + str(i), "exp", "--no_progress", '
              f'"--import", "dwiml_nb.testing"])\n'
              f'    except SystemExit as e:\n        codes.append(e.code)\n'
              f'print(json.dumps({{"codes": codes, "loaded": sorted(sys.modules)}}))\n')
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=_env(), timeout=120)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for module in ('antigravity', 'this', '__hello__', '__phello__', 'no_such_module_here'):
        assert module not in result['loaded'], module
    assert result['codes'] == [2] * len(cases)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == len(cases) and 'Traceback' not in run.stderr, run.stderr
    for i, ((field, value), line) in enumerate(zip(cases, lines)):
        assert line.startswith(f"error: file '{tmp_path / str(i)}"), line
        assert f"{field.replace('_', ' ')} '{value}' of the checkpoint is not a loaded subclass" in line, line
        assert not (tmp_path / str(i) / 'pwned').exists()


@pytest.mark.slow
@pytest.mark.parametrize('value', ['this:x', '__hello__:x'])
def test_console_script_prints_one_line_and_runs_nothing(tmp_path, toy_experiment, value):
    ckpt = _crafted(tmp_path, toy_experiment, 'model_class', value)
    run = subprocess.run([RESUME, tmp_path, 'exp', '--no_progress', '--import', 'dwiml_nb.testing'],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert run.returncode == 2
    assert run.stdout == ''   # `this` prints the Zen of Python, `__hello__` 'Hello world!' when imported
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and str(ckpt) in lines[0], run.stderr
    assert f'pass --import {value.partition(":")[0]} if that module of yours defines it' in lines[0]


@pytest.mark.slow
def test_a_class_of_a_user_module_needs_import(tmp_path, toy_experiment):
    ckpt_file = experiment_paths(toy_experiment, 'exp')['checkpoint']
    target = experiment_paths(tmp_path, 'exp')['root']
    import shutil
    shutil.copytree(ckpt_file.parents[1], target)
    run = subprocess.run([RESUME, tmp_path, 'exp', '--no_progress'], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert run.returncode == 2 and 'Traceback' not in run.stderr
    assert ("trainer class 'dwiml_nb.testing:ToyTrainer' of the checkpoint is not a loaded subclass of "
            'dwiml_nb.trainer.DWIMLAbstractTrainer') in run.stderr
    assert 'pass --import dwiml_nb.testing' in run.stderr and 'ToyTrainer.init_from_checkpoint' in run.stderr
    run = subprocess.run([RESUME, tmp_path, 'exp', '--no_progress', '--import', 'dwiml_nb.testing',
                          '--new_max_epochs', '2'], capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    assert torch.load(experiment_paths(tmp_path, 'exp')['checkpoint'], weights_only=True)['position']['epoch'] == 2


@pytest.mark.slow
def test_import_of_a_missing_module_is_one_line(tmp_path, toy_experiment):
    run = subprocess.run([RESUME, toy_experiment, 'exp', '--import', 'no_such_module_of_mine'],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert run.returncode == 2 and 'Traceback' not in run.stderr
    assert run.stderr.strip() == ("error: cannot import the module 'no_such_module_of_mine' given with --import "
                                  "(ModuleNotFoundError: No module named 'no_such_module_of_mine')")


@pytest.mark.slow
def test_main_classes_keep_their_message(tmp_path, toy_experiment):
    _crafted(tmp_path, toy_experiment, 'model_class', '__main__:NotebookModel')
    run = subprocess.run([RESUME, tmp_path, 'exp'], capture_output=True, text=True, env=_env(), timeout=120)
    assert run.returncode == 2 and 'Traceback' not in run.stderr
    assert 'the model class NotebookModel was defined in the script or notebook that trained it' in run.stderr
