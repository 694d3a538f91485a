"""An experiment folder is used by one trainer at a time, is never written through a symbolic link,
resumes only on its own logs, and a run that would train nothing is refused before it starts."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dwiml_nb.core import CheckpointError, ConfigError
from dwiml_nb.trainer import experiment_paths

from dwiml_nb.testing import ToyModel, ToySampler, ToySubset, ToyTrainer, make_toy_trainer  # noqa: E402

RESUME = Path(sys.executable).parent / 'dwiml_resume_training_from_checkpoint'


def resume(path, name='exp', **kwargs):
    return ToyTrainer.init_from_checkpoint(ToyModel(), path, name, ToySampler(ToySubset('training')),
                                           ToySampler(ToySubset('validation')), progress=False, **kwargs)


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}


@pytest.fixture
def one_epoch(tmp_path):
    make_toy_trainer(tmp_path, 'exp', max_epochs=1).train_and_validate()
    return tmp_path


# ---- 1. nothing to train -----------------------------------------------------------------------
@pytest.mark.parametrize('role', ['training', 'validation'])
def test_a_sampler_with_no_batch_is_refused_before_anything_is_written(tmp_path, role):
    samplers = {'training': ToySampler(ToySubset('training')), 'validation': ToySampler(ToySubset('validation'))}
    samplers[role] = ToySampler(ToySubset(role), max_batches_per_epoch=0)   # an epoch of 0 batches
    with pytest.raises(ConfigError, match=rf'the {role} sampler \(dwiml_nb.testing:ToySampler\) plans 0 batches: '
                                          rf'its {role} subset has no streamline'):
        ToyTrainer(ToyModel(), tmp_path, 'exp', samplers['training'], samplers['validation'], progress=False)
    assert not (tmp_path / 'exp').exists()


def test_a_real_empty_validation_subset_is_refused(tmp_path, tiny_hdf5):
    # A real sampler on a subset whose subject has no streamline plans 0 batches (it used to give a NaN loss).
    from dwiml_nb.testing import make_real_samplers, NextStepModel, NextStepTrainer
    training, validation = make_real_samplers(tiny_hdf5)
    validation._costs = [c[:0] for c in validation._costs]   # as if sub-2 had no streamline
    validation._plan_cache = None
    with pytest.raises(ConfigError, match=r"the validation sampler \(.*BatchStreamlinesSamplerOneInput\) plans 0 "
                                          r"batches: its validation subset has no streamline") as err:
        NextStepTrainer(NextStepModel(), tmp_path, 'exp', training, validation, progress=False)
    assert str(tiny_hdf5) in str(err.value)


@pytest.mark.slow
def test_resume_with_nothing_left_to_do_says_so(one_epoch):
    before = snapshot(one_epoch / 'exp')
    with pytest.raises(ConfigError, match=r'already trained 1 epoch\(s\) and max_epochs is 1: nothing to do; pass '
                                          r'new_max_epochs \(--new_max_epochs\) above 1'):
        resume(one_epoch)
    run = subprocess.run([RESUME, one_epoch, 'exp', '--import', 'dwiml_nb.testing', '--no_progress',
                          '--new_max_epochs', '1'], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and 'Traceback' not in run.stderr and 'nothing to do' in run.stderr, run.stderr
    assert snapshot(one_epoch / 'exp') == before


@pytest.mark.parametrize('kwargs, message', [
    ({'num_workers': -1}, 'num_workers must be >= 0, got -1'),
    ({'num_workers': 1.5}, 'num_workers must be an integer, got 1.5'),
    ({'max_epochs': '5'}, "max_epochs must be an integer, got '5'"),
    ({'patience': True}, 'patience must be an integer or None, got True'),
    ({'overwrite': 'false'}, "overwrite must be True or False, got 'false'"),
    ({'overwrite': 0}, 'overwrite must be True or False, got 0'),
])
def test_nonsense_settings_are_refused_and_nothing_is_deleted(one_epoch, kwargs, message):
    before = snapshot(one_epoch / 'exp')
    with pytest.raises(ConfigError, match=message):
        make_toy_trainer(one_epoch, 'exp', **kwargs)
    assert snapshot(one_epoch / 'exp') == before


# ---- 2. one trainer per experiment -------------------------------------------------------------
HOLDER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from dwiml_nb.testing import make_toy_trainer
    path = Path({path!r})

    class Hold:
        def on_batch_end(self, trainer, record):
            if record['epoch'] == 1 and record['batch'] == 1:
                (path / 'started').touch()
                while not (path / 'stop').exists(): time.sleep(0.05)

    make_toy_trainer(path, 'exp', max_epochs=2, callbacks=[Hold()], num_workers={workers}).train_and_validate()
''')


def start_holder(path, workers=0):
    proc = subprocess.Popen([sys.executable, '-c', HOLDER.format(path=str(path),
                                                                  workers=workers)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (path / 'started').exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_experiment_is_refused_at_once(tmp_path, toy_trainer):
    proc = start_holder(tmp_path)
    try:
        lock = (tmp_path / 'exp' / '.lock')
        assert lock.read_text() == f'{proc.pid}\n'
        before = {p: p.read_bytes() for p in (tmp_path / 'exp' / 'checkpoint').iterdir()}
        message = rf"another process \(pid {proc.pid}\) is training this experiment"
        with pytest.raises(ConfigError, match=message):   # a resume of it
            resume(tmp_path, new_max_epochs=3).train_and_validate()
        with pytest.raises(ConfigError, match=message):   # a new run that would delete it
            toy_trainer('exp', overwrite=True)
        run = subprocess.run([RESUME, tmp_path, 'exp', '--import', 'dwiml_nb.testing', '--no_progress',
                              '--new_max_epochs', '3'], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and 'Traceback' not in run.stderr
        assert f'another process (pid {proc.pid}) is training this experiment' in run.stderr
        assert {p: p.read_bytes() for p in (tmp_path / 'exp' / 'checkpoint').iterdir()} == before
        assert proc.poll() is None
    finally:
        (tmp_path / 'stop').touch()
        proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read()
    assert not (tmp_path / 'exp' / '.lock').exists()
    assert len(resume(tmp_path, new_max_epochs=3).train_and_validate()) == 3   # free again


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
def test_a_killed_trainer_leaves_no_lock(tmp_path, workers):
    proc = start_holder(tmp_path, workers)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # (its DataLoader workers, orphaned for a moment, do not hold the lock)
    assert len(resume(tmp_path, new_max_epochs=3).train_and_validate()) == 3


# ---- 3. no symbolic link inside ----------------------------------------------------------------
@pytest.mark.parametrize('what', ['logs', 'checkpoint', 'logs/batches.csv', 'logs/epochs.csv'])
def test_a_symbolic_link_inside_the_experiment_is_refused(one_epoch, tmp_path_factory, what):
    outside = tmp_path_factory.mktemp('outside')
    target = one_epoch / 'exp' / what
    moved = outside / Path(what).name
    target.rename(moved)
    target.symlink_to(moved, target_is_directory=moved.is_dir())
    before = snapshot(outside)
    with pytest.raises(ConfigError, match=rf"file '{target}': is a symbolic link inside the experiment folder"):
        resume(one_epoch, new_max_epochs=2).train_and_validate()
    with pytest.raises(ConfigError, match='is a symbolic link inside the experiment folder'):
        make_toy_trainer(one_epoch, 'exp', overwrite=True)
    assert snapshot(outside) == before and target.is_symlink()
    assert not (one_epoch / 'exp' / '.lock').exists()


def test_the_experiment_folder_itself_may_be_a_link(tmp_path):
    (tmp_path / 'disk').mkdir()
    (tmp_path / 'exps').mkdir()
    (tmp_path / 'exps' / 'exp').symlink_to(tmp_path / 'disk', target_is_directory=True)
    make_toy_trainer(tmp_path / 'exps', 'exp', max_epochs=1).train_and_validate()
    assert (tmp_path / 'disk' / 'checkpoint' / 'checkpoint.pt').is_file()


# ---- 4. a resume appends only to its own logs --------------------------------------------------
@pytest.mark.parametrize('log', ['batches_csv', 'epochs_csv'])
def test_an_edited_or_replaced_log_is_refused(one_epoch, tmp_path_factory, log):
    other = tmp_path_factory.mktemp('other')
    make_toy_trainer(other, 'exp', max_epochs=2, seed=99).train_and_validate()
    paths = experiment_paths(one_epoch, 'exp')
    # Another experiment's log: longer, and different in its first bytes.
    paths[log].write_bytes(experiment_paths(other, 'exp')[log].read_bytes())
    before = snapshot(paths['root'])
    with pytest.raises(CheckpointError, match=r"log is not the one the checkpoint .* was written with \(its first "
                                              r"\d+ bytes differ.*put the log of this experiment back, or start a new "
                                              r"experiment") as err:
        resume(one_epoch, new_max_epochs=2).train_and_validate()
    assert f"file '{paths[log]}'" in str(err.value)
    assert snapshot(paths['root']) == before


def test_rows_written_after_the_checkpoint_are_still_cut(one_epoch):
    paths = experiment_paths(one_epoch, 'exp')
    with open(paths['batches_csv'], 'a') as f:
        f.write('0,99,train,1.0\n')   # a row of work done after the checkpoint (a killed run)
    assert len(resume(one_epoch, new_max_epochs=2).train_and_validate()) == 2
    assert ',99,' not in paths['batches_csv'].read_text()
    ckpt = torch.load(paths['checkpoint'], weights_only=True)
    import hashlib
    data = paths['batches_csv'].read_bytes()
    assert ckpt['log_sha256']['batches_csv'] == hashlib.sha256(data[:ckpt['log_sizes']['batches_csv']]).hexdigest()


# ---- 5. the HDF5 file: absolute path, moved, rebuilt -------------------------------------------
def _real_experiment(tmp_path, monkeypatch):
    from dwiml_nb.testing import make_real_trainer, write_tiny_hdf5
    pytest.importorskip('dwiml_nb.dataset').__dict__.get('hdf5_fingerprint') or pytest.skip('no hdf5_fingerprint')
    (tmp_path / 'work').mkdir()
    monkeypatch.chdir(tmp_path / 'work')
    write_tiny_hdf5(tmp_path / 'work' / 'tiny.hdf5')
    make_real_trainer('tiny.hdf5', 'exps', 'exp', max_epochs=1).train_and_validate()   # relative paths
    monkeypatch.chdir(tmp_path)
    return tmp_path / 'work' / 'exps', tmp_path / 'work' / 'tiny.hdf5'


def test_the_checkpoint_records_the_absolute_hdf5_path_and_its_fingerprint(tmp_path, monkeypatch):
    from dwiml_nb.dataset import hdf5_fingerprint
    from dwiml_nb.trainer import load_checkpoint, resume_experiment
    exps, hdf5 = _real_experiment(tmp_path, monkeypatch)
    ckpt = load_checkpoint(exps, 'exp')
    assert ckpt['hdf5_file'] == str(hdf5) and ckpt['samplers']['validation']['source']['hdf5_file'] == str(hdf5)
    assert ckpt['hdf5_fingerprints'] == {str(hdf5): hdf5_fingerprint(hdf5)}
    # From another working directory: the absolute path finds the file.
    assert len(resume_experiment(exps, 'exp', new_max_epochs=2, progress=False).train_and_validate()) == 2


@pytest.mark.slow
def test_a_moved_hdf5_file_is_named_with_hdf5_file(tmp_path, monkeypatch):
    from dwiml_nb.trainer import resume_experiment
    exps, hdf5 = _real_experiment(tmp_path, monkeypatch)
    moved = hdf5.rename(tmp_path / 'moved.hdf5')
    with pytest.raises(CheckpointError, match=rf"the HDF5 file '{hdf5}' of the checkpoint is not there \(moved\?\): "
                                              r'pass --hdf5_file PATH'):
        resume_experiment(exps, 'exp', new_max_epochs=2, progress=False)
    run = subprocess.run([RESUME, exps, 'exp', '--import', 'dwiml_nb.testing', '--no_progress', '--new_max_epochs',
                          '2', '--hdf5_file', moved], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    ckpt = torch.load(experiment_paths(exps, 'exp')['checkpoint'], weights_only=True)
    assert ckpt['position']['epoch'] == 2 and ckpt['hdf5_file'] == str(moved)


@pytest.mark.slow
def test_a_rebuilt_hdf5_file_is_refused_unless_accepted(tmp_path, monkeypatch):
    import h5py
    from dwiml_nb.trainer import resume_experiment
    exps, hdf5 = _real_experiment(tmp_path, monkeypatch)
    with h5py.File(hdf5, 'a') as f:
        f.attrs['data_and_time'] = '2 January 2026 00:00:00'   # rebuilt: same content, another build
    before = snapshot(exps)
    with pytest.raises(CheckpointError, match=rf"the HDF5 file '{hdf5}' changed since the checkpoint \(rebuilt\?\): .*"
                                              r'pass --accept_changed_hdf5'):
        resume_experiment(exps, 'exp', new_max_epochs=2, progress=False)
    run = subprocess.run([RESUME, exps, 'exp', '--import', 'dwiml_nb.testing', '--no_progress', '--new_max_epochs',
                          '2'], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and 'Traceback' not in run.stderr and 'changed since the checkpoint' in run.stderr
    assert snapshot(exps) == before
    trainer = resume_experiment(exps, 'exp', new_max_epochs=2, accept_changed_hdf5=True, progress=False)
    assert len(trainer.train_and_validate()) == 2


def test_a_resume_from_python_on_a_rebuilt_hdf5_file_is_refused_unless_accepted(tmp_path, monkeypatch):
    import h5py
    from dwiml_nb.testing import NextStepModel, NextStepTrainer, make_real_samplers
    exps, hdf5 = _real_experiment(tmp_path, monkeypatch)
    with h5py.File(hdf5, 'a') as f:
        f.attrs['data_and_time'] = '2 January 2026 00:00:00'

    def resume_on(**kwargs):
        training, validation = make_real_samplers(hdf5)
        return NextStepTrainer.init_from_checkpoint(NextStepModel(), exps, 'exp', training, validation,
                                                    new_max_epochs=2, progress=False, **kwargs)
    with pytest.raises(CheckpointError, match=rf"the training sampler reads '{hdf5}', whose fingerprint .* is not the "
                                              r"checkpoint's .*pass accept_changed_hdf5=True"):
        resume_on()
    assert len(resume_on(accept_changed_hdf5=True).train_and_validate()) == 2
