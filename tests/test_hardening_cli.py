"""Bad command lines and experiment names: one line on stderr, exit code 2, nothing created or deleted."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from dwiml_nb.core import CheckpointError, ConfigError
from dwiml_nb.trainer import load_checkpoint

from dwiml_nb.testing import make_toy_trainer  # noqa: E402

BIN = Path(sys.executable).parent
TRAIN, RESUME = 'dwiml_train_model', 'dwiml_resume_training_from_checkpoint'

# (script, extra arguments, what the message says)
BAD_ARGUMENTS = [
    (TRAIN, ['--num_workers', '-1'], 'argument --num_workers: must be >= 0'),
    (TRAIN, ['--device', 'foo'], "argument --device: 'foo' is not a device"),
    (TRAIN, ['--device', 'cuda:x'], "argument --device: 'cuda:x' is not a device"),
    (TRAIN, ['--step_size', '1e-9'], 'argument --step_size: must be >= 0.01 or 0'),
    (TRAIN, ['--step_size', 'inf'], "argument --step_size: 'inf' is not a finite number"),
    (TRAIN, ['--step_size', 'nan'], "argument --step_size: 'nan' is not a finite number"),
    (TRAIN, ['--step_size', '-1'], 'argument --step_size: must be >= 0.01 or 0'),
    (TRAIN, ['--neighborhood_radius', '200'], 'argument --neighborhood_radius: must be >= 0 and <= 10'),
    (TRAIN, ['--batch_size', '0'], 'argument --batch_size: must be >= 1'),
    (TRAIN, ['--seed', '99999999999999999999'], 'argument --seed: must be >= 0 and <= 4294967295'),
    (TRAIN, ['--hidden_size', '1000000000'], 'argument --hidden_size: must be >= 1 and <= 16384'),
    (TRAIN, ['--num_workers', '100000'], 'argument --num_workers: must be >= 0 and <= 256'),
    (TRAIN, ['--batch_size', 'many'], "argument --batch_size: 'many' is not an integer"),
    (TRAIN, ['--max_epochs', '0'], 'argument --max_epochs: must be > 0'),
    (TRAIN, ['--learning_rate', '-1'], 'argument --learning_rate: must be > 0'),
    (TRAIN, ['--learning_rate', 'nan'], "argument --learning_rate: 'nan' is not a finite number"),
    (TRAIN, ['--num_threads', '0'], 'argument --num_threads: must be > 0'),
    (TRAIN, ['--split_ratio', '2'], 'argument --split_ratio: must be >= 0 and <= 1'),
    (TRAIN, ['--no_such_option'], 'unrecognized arguments: --no_such_option'),
    (RESUME, ['--num_workers', '-1'], 'argument --num_workers: must be >= 0'),
    (RESUME, ['--num_threads', '0'], 'argument --num_threads: must be > 0'),
    (RESUME, ['--new_max_epochs', '0'], 'argument --new_max_epochs: must be > 0'),
    (RESUME, ['--new_patience', '-3'], 'argument --new_patience: must be > 0'),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((TRAIN, ['--device', 'cuda'], "argument --device: 'cuda': CUDA is not available"))


def run_script(script, *args):
    return subprocess.run([BIN / script, *map(str, args)], capture_output=True, text=True, timeout=180)


def assert_one_line_error(run, *texts):
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert 'Traceback' not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(('error:', 'usage:')), run.stderr
    for text in texts:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _positional(script, tmp):
    if script == TRAIN:
        return [tmp / 'exps', 'run', tmp / 'missing.hdf5', 'input', 'streamlines']
    return [tmp / 'exps', 'run']


@pytest.fixture(scope='module')
def bad_argument_runs(tmp_path_factory):
    "Every bad command line, run 4 at a time (each is a fresh interpreter importing torch)."
    tmp = tmp_path_factory.mktemp('cli')
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda case: run_script(case[0], *_positional(case[0], tmp), *case[1]), BAD_ARGUMENTS))
    assert not (tmp / 'exps').exists()   # nothing created
    return dict(zip(range(len(BAD_ARGUMENTS)), runs))


@pytest.mark.parametrize('case', range(len(BAD_ARGUMENTS)),
                         ids=[f'{s.split("_")[1]}{" ".join(a)}' for s, a, _ in BAD_ARGUMENTS])
@pytest.mark.slow
def test_bad_argument_is_one_line_and_exit_2(bad_argument_runs, case):
    script, _, message = BAD_ARGUMENTS[case]
    line = assert_one_line_error(bad_argument_runs[case], message)
    assert line.startswith(f'error: {script}: ') and f'(see {script} --help)' in line


@pytest.mark.slow
@pytest.mark.parametrize('name', ['..', '.', '', 'a/b', '/abs/run', '../outside'])
def test_train_script_refuses_an_experiment_name_that_is_not_a_folder_name(tmp_path, name):
    exps = tmp_path / 'exps'
    exps.mkdir()
    # What `--overwrite` would delete if '..' were taken as the experiment: the parent's folders.
    for sub in ('logs', 'checkpoint', 'best_model', 'last_model'):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / 'keep.txt').write_text('mine')
    run = run_script(TRAIN, exps, name, tmp_path / 'missing.hdf5', 'input', 'streamlines', '--overwrite')
    assert_one_line_error(run, f'experiment name {name!r} is not a folder name')
    for sub in ('logs', 'checkpoint', 'best_model', 'last_model'):
        assert (tmp_path / sub / 'keep.txt').read_text() == 'mine'
    assert sorted(p.name for p in exps.iterdir()) == []


@pytest.mark.parametrize('name', ['..', '', '/abs'])
def test_trainer_refuses_a_bad_name_before_deleting_anything(tmp_path, name):
    (tmp_path / 'logs').mkdir()
    (tmp_path / 'logs' / 'keep.txt').write_text('mine')
    (tmp_path / 'exps').mkdir()
    with pytest.raises(ConfigError, match='is not a folder name'):
        make_toy_trainer(tmp_path / 'exps', name, overwrite=True)
    assert (tmp_path / 'logs' / 'keep.txt').read_text() == 'mine'


@pytest.mark.slow
def test_train_script_refuses_an_experiments_path_under_a_file(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    run = run_script(TRAIN, tmp_path / 'a_file' / 'exps', 'run', tmp_path / 'missing.hdf5', 'input', 'streamlines')
    assert_one_line_error(run, f"file '{tmp_path / 'a_file' / 'exps'}': experiments_path cannot be created",
                          'is not a folder')
    run = run_script(TRAIN, tmp_path / 'a_file', 'run', tmp_path / 'missing.hdf5', 'input', 'streamlines')
    assert_one_line_error(run, 'experiments_path is not a folder')


@pytest.mark.slow
def test_train_script_refuses_a_read_only_experiments_path(tmp_path, read_only_folder):
    parent = read_only_folder
    try:
        run = run_script(TRAIN, parent / 'exps', 'run', tmp_path / 'missing.hdf5', 'input', 'streamlines')
        assert_one_line_error(run, 'experiments_path cannot be written', 'read-only')
        assert not (parent / 'exps').exists()
    finally:
        if parent.is_relative_to(tmp_path): parent.chmod(0o755)


@pytest.fixture(scope='module')
def experiments(tmp_path_factory):
    path = tmp_path_factory.mktemp('exps')
    for name in ('run_a', 'run_b'):
        make_toy_trainer(path, name, max_epochs=1).train_and_validate()
    (path / 'not_an_experiment').mkdir()
    return path


@pytest.mark.slow
def test_resume_of_a_missing_experiment_lists_those_that_exist(experiments):
    with pytest.raises(CheckpointError, match=r"run_c': no such experiment folder; the experiments in '.*' are: "
                                              r'run_a, run_b$'):
        load_checkpoint(experiments, 'run_c')
    run = run_script(RESUME, experiments, 'run_c', '--no_progress')
    assert_one_line_error(run, f"file '{experiments / 'run_c'}': no such experiment folder",
                          'are: run_a, run_b')
    assert not (experiments / 'run_c').exists()


@pytest.mark.slow
def test_resume_with_a_bad_name_or_path(tmp_path, experiments):
    run = run_script(RESUME, experiments, '..')
    assert_one_line_error(run, "experiment name '..' is not a folder name")
    run = run_script(RESUME, tmp_path / 'nowhere', 'run_a')
    assert_one_line_error(run, 'no such experiment folder', f"experiments_path '{tmp_path / 'nowhere'}' is not a folder")
    (tmp_path / 'empty').mkdir()
    run = run_script(RESUME, tmp_path / 'empty', 'run_a')
    assert_one_line_error(run, 'no such experiment folder', 'there is no experiment in')


CREATE = 'dwiml_create_hdf5_dataset'


@pytest.mark.parametrize('extra, message', [
    (['--step_size', '1e-9'], 'argument --step_size: must be >= 0.01'),
    (['--nb_points', '100000000000'], 'argument --nb_points: must be >= 2 and <= 100000'),
    (['--compress', 'inf'], "argument --compress: 'inf' is not a finite number"),
])
def test_resampling_options_of_the_builder_are_bounded(tmp_path, extra, message):
    # Before: --step_size 1e-9 tried to allocate 1.17 TiB while resampling.
    run = subprocess.run([BIN / CREATE, 'db', 'out.hdf5', 'c.json', 't.txt', 'v.txt', 'x.txt', *extra],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert_one_line_error(run, message)


def test_a_fifo_as_the_builders_config_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / 'c.json')
    (tmp_path / 'db').mkdir()
    for name in ('t.txt', 'v.txt', 'x.txt'): (tmp_path / name).write_text('')
    run = subprocess.run([BIN / CREATE, 'db', 'out.hdf5', 'c.json', 't.txt', 'v.txt', 'x.txt'],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert_one_line_error(run, 'groups config: is not a regular file')
    assert not (tmp_path / 'out.hdf5').exists()


@pytest.mark.parametrize('script, argv', [(TRAIN, ['x' * 300, 'run', 'missing.hdf5', 'input', 'streamlines']),
                                          (RESUME, ['x' * 300, 'run'])])
@pytest.mark.slow
def test_a_path_the_system_refuses_is_one_line(tmp_path, script, argv):
    run = subprocess.run([BIN / script, *argv], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert_one_line_error(run, 'too long')


def test_the_builders_output_folder_is_checked_before_any_work(tmp_path):
    (tmp_path / 'db').mkdir(); (tmp_path / 'afile').write_text('')
    (tmp_path / 'c.json').write_text('{"input": {"type": "volume", "files": ["input.nii.gz"], "standardization": "none"}}')
    for name in ('t.txt', 'v.txt', 'x.txt'): (tmp_path / name).write_text('')
    (tmp_path / 't.txt').write_text('sub-01\n'); (tmp_path / 'db' / 'sub-01').mkdir()
    for out, message in (('afile/out.hdf5', "cannot be written: 'afile' is not a folder"),
                         ('afile/sub/out.hdf5', "cannot be written: 'afile' is not a folder")):
        run = subprocess.run([BIN / CREATE, 'db', out, 'c.json', 't.txt', 'v.txt', 'x.txt'],
                             capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert_one_line_error(run, message)
