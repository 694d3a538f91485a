"""DWIMLAbstractTrainer: logs, checkpoints, exact resume (also after SIGKILL), clear errors."""
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dwiml_nb
from dwiml_nb.core import CheckpointError, ConfigError
from dwiml_nb.trainer import (BATCH_COLUMNS, EPOCH_ARRAYS, EPOCH_COLUMNS, TIMING_COLUMNS, DWIMLAbstractTrainer,
                              NonFiniteLossError, experiment_paths, load_checkpoint, resume_main)

from dwiml_nb.testing import (NextStepModel, NextStepTrainer, ToyModel, ToySampler, ToySubset,  # noqa: E402
                                ToyTrainer, make_real_samplers, make_real_trainer, make_toy_trainer,
                                write_tiny_hdf5)

# Bitwise comparisons need the same reduction order in every process.
torch.set_num_threads(1)
# Exercise clipping, a scheduler and mid-epoch checkpoints in every resume test.
RUN = dict(clip_grad=0.5, lr_scheduler={'name': 'StepLR', 'step_size': 1, 'gamma': 0.7}, optimizer='AdamW',
           weight_decay=0.01, checkpoint_every_n_batches=2)


def assert_same_experiment(a, b):
    "Two experiment folders hold bitwise the same models and the same logs except timing."
    pa, pb = experiment_paths(*a), experiment_paths(*b)
    for key in ('best_model', 'last_model'):
        sa, sb = torch.load(pa[key], weights_only=True), torch.load(pb[key], weights_only=True)
        assert sa.keys() == sb.keys()
        for k in sa: assert torch.equal(sa[k], sb[k]), (key, k)
    for key in ('batches_csv', 'epochs_csv'):
        da, db = pd.read_csv(pa[key]), pd.read_csv(pb[key])
        pd.testing.assert_frame_equal(da.drop(columns=list(TIMING_COLUMNS)), db.drop(columns=list(TIMING_COLUMNS)),
                                      check_exact=True)
    for name, column in EPOCH_ARRAYS.items():
        if column not in TIMING_COLUMNS:
            np.testing.assert_array_equal(np.load(pa['logs'] / f'{name}.npy'), np.load(pb['logs'] / f'{name}.npy'))
    ca, cb = load_checkpoint(*a), load_checkpoint(*b)
    for k in ca['optimizer_state']['state']:
        for name, v in ca['optimizer_state']['state'][k].items():
            assert torch.equal(v, cb['optimizer_state']['state'][k][name])


def resume(tmp_path, name, **kwargs):
    torch.manual_seed(99)   # a different init: the checkpoint's weights must win
    return ToyTrainer.init_from_checkpoint(ToyModel(), tmp_path, name, ToySampler(ToySubset('training')),
                                           ToySampler(ToySubset('validation')), progress=False, **kwargs)


@pytest.fixture(scope='module')
def hdf5_file(tmp_path_factory):
    "A real dwi_ml-layout HDF5 file (read by MultiSubjectDataset, sampled by dwiml_nb.sampler)."
    return write_tiny_hdf5(tmp_path_factory.mktemp('data') / 'tiny.hdf5')


def make(kind, hdf5_file, path, name='exp', **kwargs):
    "A 'toy' (stand-in sampler) or 'real' (HDF5 + MultiSubjectDataset + dwiml_nb.sampler) trainer."
    if kind == 'toy': return make_toy_trainer(path, name, **kwargs)
    return make_real_trainer(hdf5_file, path, name, **kwargs)


def resume_kind(kind, hdf5_file, path, name='exp', **kwargs):
    if kind == 'toy': return resume(path, name, **kwargs)
    torch.manual_seed(99)
    return NextStepTrainer.init_from_checkpoint(NextStepModel(nb_features=4), path, name,
                                                *make_real_samplers(hdf5_file), progress=False, **kwargs)


@pytest.fixture(scope='module')
def straight_runs(tmp_path_factory, hdf5_file):
    "4 epochs in one go (the reference every resume is compared with), made once per kind."
    runs = {}

    def get(kind):
        if kind not in runs:
            path = tmp_path_factory.mktemp(f'straight_{kind}')
            make(kind, hdf5_file, path, max_epochs=4, **RUN).train_and_validate()
            runs[kind] = (path, 'exp', kind)
        return runs[kind]
    return get


@pytest.fixture(params=['toy', 'real'])
def straight_run(request, straight_runs):
    return straight_runs(request.param)


@pytest.fixture
def toy_run(straight_runs):
    return straight_runs('toy')


@pytest.mark.slow
@pytest.mark.parametrize('num_workers', [0, 2])
def test_stop_at_2_then_resume_to_4_is_bitwise_identical(tmp_path, straight_run, hdf5_file, num_workers):
    kind = straight_run[2]
    make(kind, hdf5_file, tmp_path, max_epochs=2, num_workers=num_workers, **RUN).train_and_validate()
    trainer = resume_kind(kind, hdf5_file, tmp_path, new_max_epochs=4, num_workers=num_workers)
    assert (trainer.epoch, trainer.batches_done) == (2, 0)
    history = trainer.train_and_validate()
    assert [r['epoch'] for r in history] == [0, 1, 2, 3]
    assert_same_experiment((tmp_path, 'exp'), straight_run[:2])


def test_logs_agree_with_batches_and_are_documented(toy_run):
    paths = experiment_paths(*toy_run[:2])
    batches, epochs = pd.read_csv(paths['batches_csv']), pd.read_csv(paths['epochs_csv'])
    assert tuple(batches.columns) == BATCH_COLUMNS and tuple(epochs.columns) == EPOCH_COLUMNS
    train = batches[batches.phase == 'train']
    assert len(train) == 4 * 5 and len(batches[batches.phase == 'valid']) == 4 * 2
    for e, rows in train.groupby('epoch'):
        expected = (rows.loss * rows.weight).sum() / rows.weight.sum()   # the obvious weighted mean
        assert epochs.train_loss[e] == pytest.approx(expected, rel=1e-12)
        valid = batches[(batches.phase == 'valid') & (batches.epoch == e)]
        assert epochs.valid_loss[e] == pytest.approx((valid.loss * valid.weight).sum() / valid.weight.sum(), rel=1e-12)
        assert epochs.grad_norm[e] == pytest.approx(rows.grad_norm.mean(), rel=1e-12)
    assert (train.grad_norm_clipped <= 0.5 + 1e-5).all() and (train.grad_norm > 0.5).any()
    np.testing.assert_allclose(epochs.learning_rate, 0.01 * 0.7 ** np.arange(4))
    assert epochs.best_valid_loss.iloc[-1] == epochs.valid_loss.min()
    np.testing.assert_array_equal(np.load(paths['logs'] / 'valid_loss_per_epoch.npy'), epochs.valid_loss)
    best = torch.load(paths['best_model'], weights_only=True)
    assert set(best) == set(ToyModel().state_dict())
    params = json.loads(paths['parameters'].read_text())
    assert params['model_class'] == 'dwiml_nb.testing:ToyModel' and params['trainer_params']['clip_grad'] == 0.5


def test_checkpoint_loads_weights_only_and_holds_the_run(toy_run):
    ckpt = torch.load(experiment_paths(*toy_run[:2])['checkpoint'], weights_only=True)
    assert ckpt['dwiml_nb_version'] == dwiml_nb.__version__
    assert ckpt['trainer_class'] == 'dwiml_nb.testing:ToyTrainer'
    assert ckpt['model_params'] == {'hidden': 16, 'dropout': 0.2}
    assert ckpt['position'] == {'epoch': 4, 'batches_done': 0}
    assert ckpt['samplers']['training']['params']['batch_size'] == 8
    assert len(ckpt['history']) == 4 and ckpt['best_epoch'] in range(4)


def test_mid_epoch_checkpoint_position_is_what_the_loop_consumed(tmp_path, toy_trainer):
    seen = []

    class Probe:
        def on_batch_end(self, trainer, record):
            if (record['epoch'], record['batch']) == (1, 1):
                seen.append(load_checkpoint(tmp_path, 'exp'))

    toy_trainer('exp', max_epochs=2, num_workers=2, callbacks=[Probe()], **RUN).train_and_validate()
    ckpt, = seen
    assert ckpt['position'] == {'epoch': 1, 'batches_done': 2}
    assert ckpt['sampler_states']['training']['next_batch'] == 2 and ckpt['sampler_states']['training']['epoch'] == 1


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from test_trainer import make

    class KillAfter:
        def on_batch_end(self, trainer, record):
            if (record['epoch'], record['batch']) == ({epoch}, {batch}):
                os.kill(os.getpid(), signal.SIGKILL)

    make({kind!r}, {hdf5!r}, {path!r}, max_epochs=4, num_workers={workers}, callbacks=[KillAfter()],
         **{run!r}).train_and_validate()
''')


@pytest.mark.slow
@pytest.mark.parametrize('num_workers', [0, 2])
def test_sigkill_mid_epoch_then_resume_script_is_bitwise_identical(tmp_path, straight_runs, hdf5_file, num_workers):
    # The real stack (HDF5, MultiSubjectDataset, BatchStreamlinesSamplerOneInput), killed after batch
    # index 2 of epoch 2: the last checkpoint is at 2 batches of epoch 2, and the log row of batch 2
    # was written after it (the resume must cut it, then redo the batch).
    straight_run = straight_runs('real')
    script = KILL_SCRIPT.format(epoch=2, batch=2, kind='real', hdf5=str(hdf5_file),
                                path=str(tmp_path / 'exps'), workers=num_workers, run=RUN)
    exps = tmp_path / 'exps'
    # Output to a file, not a pipe: orphaned DataLoader workers would hold a pipe open for seconds.
    with open(tmp_path / 'output.txt', 'w') as out:
        # run from this folder: `python -c` imports this test module (its `make`) from the current folder
        proc = subprocess.run([sys.executable, '-c', script], stdout=out, stderr=subprocess.STDOUT, timeout=120,
                              cwd=Path(__file__).parent)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / 'output.txt').read_text()
    assert load_checkpoint(exps, 'exp')['position'] == {'epoch': 2, 'batches_done': 2}
    assert len(pd.read_csv(exps / 'exp/logs/batches.csv').query('epoch == 2 and phase == "train"')) == 3
    # The console script rebuilds model, samplers (from the hdf5 file for the real ones) and trainer.
    with pytest.raises(SystemExit) as exit_:
        resume_main([str(exps), 'exp', '--no_progress'])
    assert exit_.value.code == 0
    assert_same_experiment((exps, 'exp'), straight_run[:2])


def test_real_checkpoint_records_how_to_rebuild_the_samplers(tmp_path, hdf5_file):
    make_real_trainer(hdf5_file, tmp_path, max_epochs=1, lr_scheduler={'name': 'ReduceLROnPlateau'}).train_and_validate()
    ckpt = load_checkpoint(tmp_path, 'exp')
    spec = ckpt['samplers']['training']
    assert spec['class'] == 'dwiml_nb.sampler:BatchStreamlinesSamplerOneInput'
    assert spec['source'] == {'hdf5_file': str(hdf5_file), 'set_name': 'training', 'lazy': False}
    assert spec['params']['batch_size'] == 8 and spec['params']['input_group'] == 'input'
    assert ckpt['samplers']['validation']['source']['set_name'] == 'validation'
    assert ckpt['hdf5_file'] == str(hdf5_file) and ckpt['model_params'] == {'nb_features': 4, 'hidden': 16, 'dropout': 0.2}


def test_existing_experiment_is_refused_unless_overwrite(tmp_path, toy_trainer):
    toy_trainer('exp', max_epochs=1).train_and_validate()
    with pytest.raises(ConfigError, match="file '.*exp': the experiment folder already exists"):
        toy_trainer('exp')
    trainer = toy_trainer('exp', max_epochs=1, overwrite=True)
    trainer.train_and_validate()
    assert len(pd.read_csv(trainer.paths['epochs_csv'])) == 1


@pytest.fixture
def one_epoch(tmp_path, toy_trainer):
    toy_trainer('exp', max_epochs=1).train_and_validate()
    return tmp_path, experiment_paths(tmp_path, 'exp')['checkpoint']


@pytest.mark.parametrize('damage, message', [
    (lambda p: p.unlink(), 'no checkpoint'),
    (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), 'truncated or corrupted'),
    (lambda p: p.write_bytes(b'\x00garbage' * 100), 'truncated or corrupted'),
    (lambda p: torch.save({'model_state': {}}, p), 'not a dwiml_nb trainer checkpoint'),
])
def test_broken_checkpoint_is_refused(one_epoch, damage, message):
    path, ckpt = one_epoch
    damage(ckpt)
    with pytest.raises(CheckpointError, match=message) as err:
        resume(path, 'exp', new_max_epochs=2)
    assert 'checkpoint.pt' in str(err.value)


def test_checkpoint_of_another_version_or_model_is_refused_and_kept(one_epoch):
    path, ckpt_file = one_epoch
    before = ckpt_file.read_bytes()
    with pytest.raises(CheckpointError, match=r'shape mismatch: net\.0\.bias'):
        ToyTrainer.init_from_checkpoint(ToyModel(hidden=8), path, 'exp', ToySampler(ToySubset('training')))
    with pytest.raises(CheckpointError, match=r'missing keys: .*unexpected keys'):
        ToyTrainer.init_from_checkpoint(torch.nn.Sequential(torch.nn.Linear(3, 3)), path, 'exp',
                                        ToySampler(ToySubset('training')))
    assert ckpt_file.read_bytes() == before
    ckpt = torch.load(ckpt_file, weights_only=True)
    major, minor, *_ = dwiml_nb.__version__.split('.')
    ckpt['dwiml_nb_version'] = f'{major}.{int(minor) + 1}.0'
    torch.save(ckpt, ckpt_file)
    with pytest.raises(CheckpointError, match='major.minor differ'):
        resume(path, 'exp')


def test_resume_script_refuses_a_model_class_it_cannot_import(one_epoch, capsys):
    path, ckpt_file = one_epoch
    ckpt = torch.load(ckpt_file, weights_only=True)
    ckpt['model_class'] = 'no_such_module_here:Model'
    torch.save(ckpt, ckpt_file)
    with pytest.raises(SystemExit) as exit_:
        resume_main([str(path), 'exp', '--new_max_epochs', '2', '--no_progress'])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "the model class 'no_such_module_here:Model' of the checkpoint is not a loaded subclass" in err
    assert '--import no_such_module_here' in err and 'Traceback' not in err


def test_resume_script_says_how_to_resume_a_class_of_a_notebook(one_epoch, capsys):
    path, ckpt_file = one_epoch
    ckpt = torch.load(ckpt_file, weights_only=True)
    ckpt['model_class'] = '__main__:NotebookModel'
    torch.save(ckpt, ckpt_file)
    with pytest.raises(SystemExit) as exit_:
        resume_main([str(path), 'exp', '--new_max_epochs', '2', '--no_progress'])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert 'the model class NotebookModel was defined in the script or notebook that trained it' in err
    assert '.init_from_checkpoint(model, ' in err and 'Traceback' not in err


def test_nan_loss_stops_with_position_and_keeps_last_good_checkpoint(tmp_path, toy_trainer):
    trainer = toy_trainer('exp', max_epochs=3, checkpoint_every_n_batches=2)
    trainer.nan_at = (1, 3)
    with pytest.raises(NonFiniteLossError, match='training loss is nan at epoch 1, batch 3'):
        trainer.train_and_validate()
    ckpt = load_checkpoint(tmp_path, 'exp')
    assert ckpt['position'] == {'epoch': 1, 'batches_done': 2}
    # The resumed run without the NaN goes on from the good checkpoint.
    assert len(resume(tmp_path, 'exp').train_and_validate()) == 3


class ConstantLossTrainer(ToyTrainer):
    "A loss that never improves: early stopping must kick in."
    def compute_batch_loss(self, data, is_training):
        return sum(p.sum() * 0 for p in self.model.parameters()) + 1.0


def test_early_stopping_and_resume_with_new_patience(tmp_path, toy_trainer):
    calls = []

    class Recorder:
        def on_train_begin(self, trainer): calls.append('begin')
        def on_batch_end(self, trainer, record): calls.append('batch')
        def on_epoch_end(self, trainer, record): calls.append(('epoch', record['patience_count']))
        def on_train_end(self, trainer): calls.append('end')

    trainer = toy_trainer('exp', trainer_cls=ConstantLossTrainer, max_epochs=10, patience=2,
                               callbacks=[Recorder()])
    history = trainer.train_and_validate()
    assert len(history) == 3 and [r['patience_count'] for r in history] == [0, 1, 2]
    assert calls[0] == 'begin' and calls[-1] == 'end' and calls.count('batch') == 3 * 5
    assert [c for c in calls if isinstance(c, tuple)] == [('epoch', 0), ('epoch', 1), ('epoch', 2)]
    torch.manual_seed(0)
    resumed = ConstantLossTrainer.init_from_checkpoint(ToyModel(), tmp_path, 'exp', ToySampler(ToySubset('training')),
                                                       ToySampler(ToySubset('validation')), new_patience=4,
                                                       progress=False)
    assert len(resumed.train_and_validate()) == 5


def test_bad_parameters_are_refused(tmp_path, toy_trainer):
    with pytest.raises(ConfigError, match="optimizer 'Adamax' is not one of Adam, AdamW, RAdam, SGD"):
        toy_trainer(optimizer='Adamax')
    with pytest.raises(ConfigError, match='not a class of torch.optim.lr_scheduler'):
        toy_trainer(lr_scheduler={'name': 'Nope'})
    with pytest.raises(ConfigError, match='patience must be positive'):
        toy_trainer(patience=0)
    with pytest.raises(NotImplementedError, match='compute_batch_loss'):
        toy_trainer('abstract', trainer_cls=DWIMLAbstractTrainer, max_epochs=1).train_and_validate()


def test_inputs_left_to_the_main_process_give_the_same_training(tmp_path, hdf5_file):
    "inputs_in_workers=False: workers send points only, the trainer interpolates (add_inputs); same weights."
    from dwiml_nb.testing import NextStepModel, NextStepTrainer, make_real_samplers
    weights = []
    for inputs_in_workers in (True, False):
        training, validation = make_real_samplers(hdf5_file, inputs_in_workers=inputs_in_workers)
        torch.manual_seed(0)
        trainer = NextStepTrainer(NextStepModel(nb_features=4), tmp_path, f'w{inputs_in_workers}', training,
                                  validation, max_epochs=2, learning_rate=0.01, num_workers=1, progress=False)
        trainer.train_and_validate()
        weights.append(trainer.model.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
