"""The trainer's options of issue #16: schedules, gradient accumulation, mixed precision, EMA, lr_find."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from dwiml_nb.core import ConfigError
from dwiml_nb.testing import (NextStepModel, points_with_a_next, NextStepTrainer, ToyModel, ToySampler, ToySubset, ToyTrainer,
                              make_real_samplers, make_real_trainer, make_toy_trainer, write_tiny_hdf5)
from dwiml_nb.trainer import TIMING_COLUMNS, experiment_paths, load_checkpoint

torch.set_num_threads(1)   # bitwise comparisons need the same reduction order


class PointWeightedTrainer(ToyTrainer):
    "ToyTrainer whose batch weight is its number of points: then N batches' weighted mean is one big batch's loss."
    def compute_batch_loss(self, data, is_training):
        idx = points_with_a_next(data.streamlines)
        x = data.inputs.to(self.device)
        return torch.nn.functional.mse_loss(self.model(x[idx] / 10), x[idx + 1] - x[idx]), len(idx)


class StopAt:
    "A callback that interrupts training after a given (epoch, batch), like a kill."
    def __init__(self, epoch, batch): self.at = (epoch, batch)

    def on_batch_end(self, trainer, record):
        if (record['epoch'], record['batch']) == self.at: raise KeyboardInterrupt


def same_weights(a, b):
    return all(torch.equal(v, b[k]) for k, v in a.items()) and a.keys() == b.keys()


def logs_without_timing(path, name):
    paths = experiment_paths(path, name)
    return [pd.read_csv(paths[k]).drop(columns=list(TIMING_COLUMNS)) for k in ('batches_csv', 'epochs_csv')]


def test_two_accumulated_batches_equal_one_batch_twice_as_large(tmp_path):
    def trained(batch_size, accumulation):
        torch.manual_seed(0)
        model = ToyModel(dropout=0.0)
        samplers = [ToySampler(ToySubset(s), batch_size=batch_size, noise=0.0) for s in ('training', 'validation')]
        trainer = PointWeightedTrainer(model, tmp_path, f'b{batch_size}', *samplers, max_epochs=2, learning_rate=0.01,
                                       progress=False, clip_grad=0.5, grad_accumulation=accumulation)
        trainer.train_and_validate()
        return trainer
    big, accumulated = trained(16, 1), trained(8, 2)
    for k, v in big.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    batches = pd.read_csv(experiment_paths(tmp_path, 'b8')['batches_csv'])
    train = batches[batches.phase == 'train']
    # 5 batches per epoch: steps after batches 1, 3 and 4 (the epoch's last)
    assert train.optimizer_step.tolist() == [0, 1, 0, 1, 1] * 2
    assert train.grad_norm.isna().tolist() == [True, False, True, False, False] * 2
    epochs = pd.read_csv(experiment_paths(tmp_path, 'b8')['epochs_csv'])
    np.testing.assert_allclose(epochs.grad_norm, train.groupby('epoch').grad_norm.mean())
    assert load_checkpoint(tmp_path, 'b8')['epoch_accumulators'] == {**load_checkpoint(tmp_path, 'b8')[
        'epoch_accumulators'], 'nb_optimizer_steps': 0}


RESUMED = dict(lr_scheduler={'name': 'warmup_cosine', 'warmup': 3}, schedule_unit='step', grad_accumulation=2,
               checkpoint_every_n_batches=1, precision='bf16', ema_decay=0.9, clip_grad=0.5)


def test_checkpoints_wait_for_the_optimizer_step_and_resume_exactly(tmp_path):
    straight = make_toy_trainer(tmp_path, 'straight', max_epochs=2, **RESUMED)
    straight.train_and_validate()
    with pytest.raises(KeyboardInterrupt):
        make_toy_trainer(tmp_path, 'cut', max_epochs=2, callbacks=[StopAt(1, 2)], **RESUMED).train_and_validate()
    ckpt = load_checkpoint(tmp_path, 'cut')
    assert ckpt['position'] == {'epoch': 1, 'batches_done': 2}   # batch 2 ended mid-accumulation: not saved
    assert ckpt['trainer_params']['lr_scheduler'] == {'name': 'warmup_cosine', 'warmup': 3, 'total': 6}
    assert ckpt['ema_state'] is not None and ckpt['scaler_state'] is None
    torch.manual_seed(99)
    resumed = ToyTrainer.init_from_checkpoint(ToyModel(), tmp_path, 'cut', ToySampler(ToySubset('training')),
                                              ToySampler(ToySubset('validation')), progress=False)
    resumed.train_and_validate()
    assert same_weights(resumed.model.state_dict(), straight.model.state_dict())
    for a, b in zip(logs_without_timing(tmp_path, 'cut'), logs_without_timing(tmp_path, 'straight')):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    paths = experiment_paths(tmp_path, 'cut')
    ema = torch.load(paths['last_model_ema'], weights_only=True)
    assert same_weights(ema, torch.load(experiment_paths(tmp_path, 'straight')['last_model_ema'], weights_only=True))
    assert not same_weights(ema, torch.load(paths['last_model'], weights_only=True))


def test_warmup_then_cosine_step_wise_is_what_the_batch_log_shows(tmp_path):
    trainer = make_toy_trainer(tmp_path, 'sched', max_epochs=2, learning_rate=0.1, schedule_unit='step',
                               lr_scheduler={'name': 'warmup_cosine', 'warmup': 4})
    trainer.train_and_validate()
    train = pd.read_csv(experiment_paths(tmp_path, 'sched')['batches_csv']).query("phase == 'train'")
    from dwiml_nb.schedules import warmup_cosine_factor
    np.testing.assert_allclose(train.learning_rate, 0.1 * warmup_cosine_factor(np.arange(10), total=10, warmup=4))


def test_one_cycle_epoch_wise(tmp_path):
    trainer = make_toy_trainer(tmp_path, 'cycle', max_epochs=3, learning_rate=0.1, lr_scheduler={'name': 'one_cycle'})
    trainer.train_and_validate()
    epochs = pd.read_csv(experiment_paths(tmp_path, 'cycle')['epochs_csv'])
    assert epochs.learning_rate[0] == pytest.approx(0.1 / 25) and epochs.learning_rate[1] == pytest.approx(0.1)


@pytest.mark.parametrize('kwargs, message', [
    (dict(lr_scheduler={'name': 'os.system'}), "name 'os.system' is not a class of torch.optim.lr_scheduler we allow"),
    (dict(lr_scheduler={'name': 'ReduceLROnPlateau'}, schedule_unit='step'), "needs schedule_unit='epoch'"),
    (dict(schedule_unit='batch'), 'schedule_unit must be one of epoch, step'),
    (dict(grad_accumulation=0), 'grad_accumulation must be an integer >= 1'),
    (dict(precision='fp8'), 'precision must be one of fp32, bf16, fp16'),
    (dict(precision='fp16'), "precision='fp16' needs a CUDA device"),
    (dict(ema_decay=1.0), 'ema_decay must be a number between 0 and 1'),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_toy_trainer(tmp_path, 'bad', **kwargs)
    assert not (tmp_path / 'bad').exists()


def test_bf16_trains_and_validates_under_autocast(tmp_path):
    seen = []

    class Probe(ToyTrainer):
        def compute_batch_loss(self, data, is_training):
            seen.append(torch.is_autocast_enabled('cpu'))
            return super().compute_batch_loss(data, is_training)
    history = make_toy_trainer(tmp_path, 'bf16', trainer_cls=Probe, max_epochs=1, precision='bf16').train_and_validate()
    assert all(seen) and len(seen) == 5 + 2 and math.isfinite(history[0]['valid_loss'])


def test_ema_is_validated_and_saved_next_to_the_models(tmp_path):
    trainer = make_toy_trainer(tmp_path, 'ema', max_epochs=2, ema_decay=0.5)
    trainer.train_and_validate()
    paths = experiment_paths(tmp_path, 'ema')
    ema = torch.load(paths['best_model_ema'], weights_only=True)
    assert ema.keys() == trainer.model.state_dict().keys()
    # validation ran on the EMA weights: their loss is the logged one
    trainer.model.load_state_dict(torch.load(paths['last_model_ema'], weights_only=True))
    trainer._batch_log = type('Null', (), {'append': lambda self, r: None})()
    trainer.epoch = 1
    assert trainer._validate_one_epoch() == pd.read_csv(paths['epochs_csv']).valid_loss.iloc[-1]


def test_lr_find_leaves_the_experiment_as_it_was(tmp_path):
    plain = make_toy_trainer(tmp_path, 'plain', max_epochs=2, checkpoint_every_n_batches=2, ema_decay=0.9,
                             lr_scheduler={'name': 'StepLR', 'step_size': 1, 'gamma': 0.5})
    plain.train_and_validate()
    swept = make_toy_trainer(tmp_path, 'swept', max_epochs=2, checkpoint_every_n_batches=2, ema_decay=0.9,
                             lr_scheduler={'name': 'StepLR', 'step_size': 1, 'gamma': 0.5})
    result = swept.lr_find(1e-4, 1.0, nb_batches=8)   # more than an epoch: runs into the next epoch's batches
    assert len(result.learning_rates) == 8 and result.suggestion is not None
    assert result.figure().layout.xaxis.type == 'log'
    swept.train_and_validate()
    assert same_weights(plain.model.state_dict(), swept.model.state_dict())
    for a, b in zip(logs_without_timing(tmp_path, 'plain'), logs_without_timing(tmp_path, 'swept')):
        pd.testing.assert_frame_equal(a, b, check_exact=True)


@pytest.mark.slow
def test_real_hdf5_with_workers_resumes_a_step_schedule_mid_epoch_exactly(tmp_path):
    hdf5 = write_tiny_hdf5(tmp_path / 'tiny.hdf5')
    run = dict(max_epochs=2, num_workers=2, **RESUMED)
    straight = make_real_trainer(hdf5, tmp_path, 'straight', **run)
    straight.train_and_validate()
    with pytest.raises(KeyboardInterrupt):
        make_real_trainer(hdf5, tmp_path, 'cut', callbacks=[StopAt(1, 2)], **run).train_and_validate()
    torch.manual_seed(99)
    resumed = NextStepTrainer.init_from_checkpoint(NextStepModel(nb_features=4), tmp_path, 'cut',
                                                   *make_real_samplers(hdf5), progress=False)
    resumed.train_and_validate()
    assert same_weights(resumed.model.state_dict(), straight.model.state_dict())
    for a, b in zip(logs_without_timing(tmp_path, 'cut'), logs_without_timing(tmp_path, 'straight')):
        pd.testing.assert_frame_equal(a, b, check_exact=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_fp16_on_cuda_keeps_the_scaler_in_the_checkpoint_and_resumes(tmp_path):
    run = dict(max_epochs=2, device='cuda', precision='fp16', checkpoint_every_n_batches=2)
    straight = make_toy_trainer(tmp_path, 'straight', **run)
    straight.train_and_validate()
    with pytest.raises(KeyboardInterrupt):
        make_toy_trainer(tmp_path, 'cut', callbacks=[StopAt(1, 1)], **run).train_and_validate()
    assert load_checkpoint(tmp_path, 'cut')['scaler_state']['scale'] > 0
    torch.manual_seed(99)
    resumed = ToyTrainer.init_from_checkpoint(ToyModel(), tmp_path, 'cut', ToySampler(ToySubset('training')),
                                              ToySampler(ToySubset('validation')), progress=False)
    resumed.train_and_validate()
    assert same_weights(resumed.model.state_dict(), straight.model.state_dict())
