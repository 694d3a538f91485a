"""Training with torch.distributed: 2 CPU processes (gloo) launched by the real `torchrun`.

The script below (written to tmp_path) is what a user runs under torchrun: build a lazy
MultiSubjectDataset on the demo phantom, real samplers, a tiny model, `NextStepTrainer`, train.
It also records, on every rank and after every step, the weights and the (subject, streamline)
pairs of the rank's batch, so the test can compare ranks with each other and with the
single-process plan.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dwiml_nb.core import CheckpointError, ConfigError
from dwiml_nb.data import make_demo_dataset
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.sampler import BatchStreamlinesSamplerOneInput
from dwiml_nb.trainer import TIMING_COLUMNS, experiment_paths, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from trainer_test_utils import NextStepModel, NextStepTrainer  # noqa: E402

TESTS_DIR = Path(__file__).parent
TORCHRUN = Path(sys.executable).parent / 'torchrun'
SAMPLER = dict(batch_size=20, seed=7, step_size=1.0, noise_gaussian_size=0.1, reverse_ratio=0.5)
TRAINING_BATCHES, VALIDATION_BATCHES = 7, 3   # odd: the last global batch is re-dealt between the 2 ranks
TRAINER = dict(max_epochs=2, learning_rate=0.01, clip_grad=0.5, checkpoint_every_n_batches=2, progress=False,
               seed=3)

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests_dir!r})
    from trainer_test_utils import NextStepModel, NextStepTrainer
    from dwiml_nb.dataset import MultiSubjectDataset
    from dwiml_nb.sampler import BatchStreamlinesSamplerOneInput

    hdf5, exp, name, mode, stop_at, record = sys.argv[1:7]
    torch.set_num_threads(1)

    class Stop(Exception): pass

    class RecordingTrainer(NextStepTrainer):
        steps = []
        def compute_batch_loss(self, data, is_training):
            if is_training:
                self.steps.append({{'epoch': int(data.epoch), 'step': int(data.step),
                                   'batch_index': int(data.batch_index),
                                   'ids': sorted(set(zip(data.subject_ids.tolist(), data.streamline_ids.tolist())))}})
            return super().compute_batch_loss(data, is_training)

    class AfterStep:
        all_ranks = True
        def on_batch_end(self, trainer, record):
            trainer.steps[-1]['weights'] = torch.cat([p.detach().flatten()
                                                      for p in trainer.unwrapped_model.parameters()]).tolist()
            if [trainer.epoch, trainer.batches_done] == json.loads(stop_at):
                raise Stop()

    ds = MultiSubjectDataset(hdf5, lazy=True, cache_size=1).load_data(progress=False)
    samplers = [BatchStreamlinesSamplerOneInput(subset, 'streamlines', 'input', max_batches_per_epoch=n, **{sampler})
                for subset, n in ((ds.training_set, {nb_train}), (ds.validation_set, {nb_valid}))]
    torch.manual_seed(0)
    model = NextStepModel(nb_features=32)
    if mode == 'resume':
        trainer = RecordingTrainer.init_from_checkpoint(model, exp, name, *samplers, callbacks=[AfterStep()],
                                                        progress=False)
    else:
        trainer = RecordingTrainer(model, exp, name, *samplers, callbacks=[AfterStep()], **{trainer})
    try:
        trainer.train_and_validate()
    except Stop:
        pass
    rank = trainer.distributed.rank
    Path(record, f'{{mode}}_rank{{rank}}.json').write_text(json.dumps(
        {{'rank': rank, 'world_size': trainer.distributed.world_size, 'steps': trainer.steps,
         'open_here': ds.training_set._opener.is_open_here()}}))
''')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    return make_demo_dataset(out, which='phantom', nb_subjects=3, progress=False).hdf5_files['phantom']


def torchrun(tmp_path, hdf5, exp, name, mode, *, stop_at=None, nproc=2):
    script = tmp_path / 'ddp_train.py'
    script.write_text(SCRIPT.format(tests_dir=str(TESTS_DIR), sampler=SAMPLER, nb_train=TRAINING_BATCHES,
                                    nb_valid=VALIDATION_BATCHES, trainer=TRAINER))
    record = tmp_path / 'records' / name
    record.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    cmd = [str(TORCHRUN), '--nproc_per_node', str(nproc), '--master_addr', '127.0.0.1',
           '--master_port', str(free_port()), str(script), str(hdf5), str(exp), name, mode,
           json.dumps(stop_at), str(record)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((record / f'{mode}_rank{r}.json').read_text()) for r in range(nproc)], done


def single_process_samplers(hdf5):
    ds = MultiSubjectDataset(hdf5).load_data(progress=False)
    return [BatchStreamlinesSamplerOneInput(subset, 'streamlines', 'input', max_batches_per_epoch=n, **SAMPLER)
            for subset, n in ((ds.training_set, TRAINING_BATCHES), (ds.validation_set, VALIDATION_BATCHES))]


def plan_pairs(plan):
    return sorted((int(s), int(i)) for batch in plan for s, ids in batch for i in ids)


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, phantom):
    "An uninterrupted 2-rank run of 2 epochs."
    tmp = tmp_path_factory.mktemp('straight')
    ranks, done = torchrun(tmp, phantom, tmp / 'exp', 'straight', 'fresh')
    return tmp / 'exp', ranks, done


def test_two_ranks_keep_identical_weights_after_every_step(straight_run):
    _, (r0, r1), _ = straight_run
    assert (r0['rank'], r1['rank'], r0['world_size']) == (0, 1, 2)
    assert len(r0['steps']) == len(r1['steps']) == 2 * (TRAINING_BATCHES + 1) // 2   # 4 steps per epoch
    for a, b in zip(r0['steps'], r1['steps']):
        assert (a['epoch'], a['step']) == (b['epoch'], b['step'])
        assert a['weights'] == b['weights'], (a['epoch'], a['step'])
    assert r0['steps'][0]['weights'] != r0['steps'][-1]['weights']   # it did train
    assert r0['open_here'] and r1['open_here']   # lazy: each rank opened the HDF5 file itself


def test_rank_batches_are_disjoint_and_together_the_single_process_plan(straight_run, phantom):
    _, (r0, r1), _ = straight_run
    training, _ = single_process_samplers(phantom)
    for epoch in range(2):
        mine = [{tuple(p) for s in r['steps'] if s['epoch'] == epoch for p in s['ids']} for r in (r0, r1)]
        assert not mine[0] & mine[1]
        assert sorted(mine[0] | mine[1]) == plan_pairs(training.epoch_plan(epoch))
        # Full rounds are the plan's own batches (same global index); the last round is the re-dealt leftover.
        for r in (r0, r1):
            indices = [s['batch_index'] for s in r['steps'] if s['epoch'] == epoch]
            assert all(i < TRAINING_BATCHES for i in indices[:-1]) and indices[-1] >= TRAINING_BATCHES
            for s in r['steps']:
                if s['epoch'] == epoch and s['batch_index'] < TRAINING_BATCHES:
                    assert sorted(map(tuple, s['ids'])) == plan_pairs([training.epoch_plan(epoch)[s['batch_index']]])


def test_rank_zero_alone_writes_one_checkpoint_and_one_log(straight_run):
    exp, (r0, _), _ = straight_run
    paths = experiment_paths(exp, 'straight')
    files = sorted(str(p.relative_to(paths['root'])) for p in paths['root'].rglob('*') if p.is_file())
    assert files == ['best_model/model_state.pt', 'checkpoint/checkpoint.pt', 'checkpoint/parameters.json',
                     'last_model/model_state.pt', 'logs/batches.csv', 'logs/epoch_time_s.npy', 'logs/epochs.csv',
                     'logs/grad_norm_per_epoch.npy', 'logs/learning_rate_per_epoch.npy',
                     'logs/train_loss_per_epoch.npy', 'logs/valid_loss_per_epoch.npy']
    batches = pd.read_csv(paths['batches_csv'])
    train = batches[batches.phase == 'train']
    assert train[['epoch', 'batch']].values.tolist() == [[e, b] for e in range(2) for b in range(4)]   # one row per step
    valid = batches[batches.phase == 'valid']
    assert len(valid) == 2 * 2   # 3 global validation batches -> 2 steps per rank, per epoch
    ckpt = load_checkpoint(exp, 'straight')
    assert ckpt['world_size'] == 2 and len(ckpt['rng_states_per_rank']) == 2
    assert not any(k.startswith('module.') for k in ckpt['model_state'])
    best = torch.load(paths['best_model'], weights_only=True)
    assert set(best) == set(NextStepModel(nb_features=32).state_dict())
    last = torch.cat([v.flatten() for v in torch.load(paths['last_model'], weights_only=True).values()])
    assert last.tolist() == r0['steps'][-1]['weights']


def test_logged_loss_is_the_weighted_mean_over_ranks(straight_run, phantom):
    "The epoch's training loss = weighted mean of every step's loss over both ranks (weights = streamlines)."
    exp, _, _ = straight_run
    paths = experiment_paths(exp, 'straight')
    batches, epochs = pd.read_csv(paths['batches_csv']), pd.read_csv(paths['epochs_csv'])
    training, _ = single_process_samplers(phantom)
    for epoch in range(2):
        train = batches[(batches.phase == 'train') & (batches.epoch == epoch)]
        assert train.nb_streamlines.sum() == len(plan_pairs(training.epoch_plan(epoch)))
        np.testing.assert_allclose((train.loss * train.weight).sum() / train.weight.sum(),
                                   epochs.train_loss[epoch], rtol=1e-12)


def test_interrupted_two_rank_run_resumes_to_the_same_weights(tmp_path, phantom, straight_run):
    straight_exp, (s0, _), _ = straight_run
    exp = tmp_path / 'exp'
    torchrun(tmp_path, phantom, exp, 'cut', 'fresh', stop_at=[1, 3])   # killed after step 3 of epoch 1
    ckpt = load_checkpoint(exp, 'cut')
    assert ckpt['position'] == {'epoch': 1, 'batches_done': 2} and ckpt['world_size'] == 2

    # A single process may not continue a 2-process epoch in the middle: refused, nothing touched.
    training, validation = single_process_samplers(phantom)
    with pytest.raises(CheckpointError, match=r'middle of epoch 1 .* by 2 process\(es\); this run has 1'):
        NextStepTrainer.init_from_checkpoint(NextStepModel(nb_features=32), exp, 'cut', training, validation,
                                             progress=False)

    (r0, r1), _ = torchrun(tmp_path, phantom, exp, 'cut', 'resume')
    assert [s['step'] for s in r0['steps']] == [2, 3]   # resumed at the checkpoint's step
    assert r0['steps'][-1]['weights'] == r1['steps'][-1]['weights'] == s0['steps'][-1]['weights']
    a, b = experiment_paths(exp, 'cut'), experiment_paths(straight_exp, 'straight')
    for key in ('best_model', 'last_model'):
        sa, sb = torch.load(a[key], weights_only=True), torch.load(b[key], weights_only=True)
        for k in sa: assert torch.equal(sa[k], sb[k]), (key, k)
    for key in ('batches_csv', 'epochs_csv'):
        pd.testing.assert_frame_equal(pd.read_csv(a[key]).drop(columns=list(TIMING_COLUMNS)),
                                      pd.read_csv(b[key]).drop(columns=list(TIMING_COLUMNS)))


def test_end_of_epoch_checkpoint_resumes_in_one_process(tmp_path, straight_run, phantom):
    "From the end of an epoch, another number of processes is fine: here 1 process continues a 2-process run."
    exp, _, _ = straight_run
    import shutil
    shutil.copytree(exp / 'straight', tmp_path / 'exp' / 'copy')
    training, validation = single_process_samplers(phantom)
    trainer = NextStepTrainer.init_from_checkpoint(NextStepModel(nb_features=32), tmp_path / 'exp', 'copy',
                                                   training, validation, new_max_epochs=3, progress=False)
    assert (trainer.epoch, trainer.batches_done, trainer.distributed.world_size) == (2, 0, 1)
    trainer.train_and_validate()
    epochs = pd.read_csv(experiment_paths(tmp_path / 'exp', 'copy')['epochs_csv'])
    assert epochs.epoch.tolist() == [0, 1, 2]
    train = pd.read_csv(experiment_paths(tmp_path / 'exp', 'copy')['batches_csv']).query("phase == 'train'")
    assert (train.epoch == 2).sum() == TRAINING_BATCHES   # one process runs the whole plan


def test_a_sampler_sharded_for_another_process_is_refused(tmp_path, phantom):
    ds = MultiSubjectDataset(phantom).load_data(progress=False)
    sharded = BatchStreamlinesSamplerOneInput(ds.training_set, 'streamlines', 'input', rank=1, world_size=2, **SAMPLER)
    with pytest.raises(ConfigError, match='share of rank 1 of 2 processes, but this process is rank 0 of 1'):
        NextStepTrainer(NextStepModel(nb_features=32), tmp_path, 'x', sharded, progress=False)
