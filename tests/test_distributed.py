"""Training with torch.distributed: 2 CPU processes (gloo) launched by the real `torchrun`.

The script below (written to tmp_path) is what a user runs under torchrun: build a lazy
MultiSubjectDataset on the demo phantom, real samplers, a tiny model, `NextStepTrainer`, train.
It also records, on every rank and after every step, the weights and the (subject, streamline)
pairs of the rank's batch, so the test can compare ranks with each other and with the
single-process plan. The split of the plan between ranks (`shard_plan`) is also checked on its
own, as a pure function, with property tests against a brute-force search (end of the file).
"""
import json
import math
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
from hypothesis import given, settings
from hypothesis import strategies as st

from dwiml_nb.core import CheckpointError, ConfigError
from dwiml_nb.data import make_demo_dataset
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.sampler import BatchIDSampler, BatchStreamlinesSamplerOneInput, plan_epoch, shard_plan
from dwiml_nb.trainer import TIMING_COLUMNS, experiment_paths, load_checkpoint

from dwiml_nb.testing import NextStepModel, NextStepTrainer  # noqa: E402

TORCHRUN = Path(sys.executable).parent / 'torchrun'
SAMPLER = dict(batch_size=20, seed=7, step_size=1.0, noise_gaussian_size=0.1, reverse_ratio=0.5)
TRAINING_BATCHES, VALIDATION_BATCHES = 7, 3   # odd: the last global batch is re-dealt between the 2 ranks
TRAINER = dict(max_epochs=2, learning_rate=0.01, clip_grad=0.5, checkpoint_every_n_batches=2, progress=False,
               seed=3)

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from dwiml_nb.testing import NextStepModel, NextStepTrainer
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
    script.write_text(SCRIPT.format(sampler=SAMPLER, nb_train=TRAINING_BATCHES,
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


@pytest.mark.slow
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
        # Batches kept from the plan are the plan's own (same global index); re-dealt ones (at least the
        # leftover, dealt into the last step) have indices after the plan's, each its own.
        for r in (r0, r1):
            indices = [s['batch_index'] for s in r['steps'] if s['epoch'] == epoch]
            assert indices[-1] >= TRAINING_BATCHES
        both = [s['batch_index'] for r in (r0, r1) for s in r['steps'] if s['epoch'] == epoch]
        assert len(both) == len(set(both))
        for r in (r0, r1):
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# The split of the plan between ranks (`shard_plan`), as a pure function: property tests against
# the slow obvious references (a brute-force search over every deal of a small round).
# ---------------------------------------------------------------------------------------------
TOLERANCE = 0.10


def batch_points(batch, points):
    return float(sum(points[s][ids].sum() for s, ids in batch))


def spread(loads):
    loads = np.asarray(loads, dtype=float)
    return 1.0 if loads.max() == 0 else (loads.max() / loads.min() if loads.min() > 0 else math.inf)


def deals(n, k):
    "Every way to put n items into k non-empty unlabelled bins (restricted growth strings)."
    def grow(prefix, used):
        if len(prefix) == n:
            if used == k: yield list(prefix)
            return
        if k - used > n - len(prefix): return
        for b in range(min(used + 1, k)):
            yield from grow(prefix + [b], max(used, b + 1))
    yield from grow([], 0)


def best_spread(points, k, cap):
    "The most even deal of `points` into k batches where no batch, less its largest streamline, exceeds `cap`."
    points, best = np.asarray(points, dtype=float), math.inf
    for owner in deals(len(points), k):
        owner = np.array(owner)
        loads = np.bincount(owner, weights=points, minlength=k)
        largest = np.array([points[owner == b].max() for b in range(k)])
        if (loads - largest <= cap + 1e-9).all():
            best = min(best, spread(loads))
    return best


def test_brute_force_reference_itself():
    assert sum(1 for _ in deals(4, 2)) == 7   # Stirling number S(4, 2)
    assert best_spread([3, 3, 2, 2, 2], 2, math.inf) == 1.0
    assert best_spread([1, 1, 1], 2, math.inf) == 2.0
    assert best_spread([4, 1, 1, 1], 2, 1) == 2.5   # 4 | 1+1+1 would be 1.33, but 1+1 > cap 1


def check_shards(plan, points, world_size):
    "Every promise of `shard_plan` (docs/distributed.md) on one plan; returns the shards."
    shards, dropped = shard_plan(plan, points, world_size)
    again, _ = shard_plan(plan, points, world_size)   # a pure function of the plan
    assert [[(b, [(s, ids.tolist()) for s, ids in batch]) for b, batch in shard] for shard in shards] == \
        [[(b, [(s, ids.tolist()) for s, ids in batch]) for b, batch in shard] for shard in again]
    everything = sorted((s, int(i)) for b in plan for s, ids in b for i in ids)
    assert len({len(shard) for shard in shards}) == 1   # the same number of steps on every rank
    if dropped:
        assert len(everything) < world_size and dropped == len(everything) and not shards[0]
        return shards
    assert sorted((s, int(i)) for shard in shards for _, b in shard for s, ids in b for i in ids) == everything
    indices = [b for shard in shards for b, _ in shard]
    assert len(indices) == len(set(indices))   # every batch its own augmentation draws
    cap = max((batch_points(b, points) for b in plan), default=0.)
    for shard in shards:
        for b, batch in shard:
            if b < len(plan): assert batch is plan[b]   # kept: the plan's own batch and index
            subjects = [s for s, _ in batch]
            assert len(subjects) == len(set(subjects)) and all(len(ids) for _, ids in batch)   # one part per subject
            streamlines = np.concatenate([points[s][ids] for s, ids in batch])
            assert batch_points(batch, points) - streamlines.max() <= cap + 1e-9   # the budget + one streamline
    for step in range(len(shards[0])):
        batches = [shard[step][1] for shard in shards]
        loads = [batch_points(b, points) for b in batches]
        streamlines = np.concatenate([points[s][ids] for b in batches for s, ids in b])
        if len(streamlines) <= 8:
            best = best_spread(streamlines, world_size, cap)
            assert spread(loads) <= max(1 + TOLERANCE, best) + 1e-9, (step, loads, best)
        elif 11 * streamlines.max() <= np.mean(loads):   # LPT alone guarantees the 10 %
            assert spread(loads) <= 1 + TOLERANCE + 1e-9, (step, loads)
    return shards


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.integers(1, 60), max_size=30), min_size=1, max_size=4), st.integers(2, 8),
       st.integers(20, 200), st.integers(1, 3), st.integers(0, 2**16))
@pytest.mark.slow
def test_shard_plan_properties_on_sampler_plans(costs, world_size, budget, nb_subjects, seed):
    points = [np.array(c, dtype=float) for c in costs]
    plan = plan_epoch(points, float(max(budget, max((max(c) for c in costs if c), default=1))),
                      np.random.default_rng(seed), nb_subjects_per_batch=nb_subjects)
    check_shards(plan, points, world_size)


@st.composite
def any_plan(draw):
    "Any plan: streamlines of a few subjects cut in batches at random, one part per subject."
    points = [np.array(draw(st.lists(st.integers(1, 50), min_size=1, max_size=20)), dtype=float)
              for _ in range(draw(st.integers(1, 3)))]
    streamlines = [(s, i) for s, p in enumerate(points) for i in range(len(p))]
    order = draw(st.permutations(streamlines))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(order) - 1), max_size=12)))) if len(order) > 1 else []
    plan = []
    for a, b in zip([0] + cuts, cuts + [len(order)]):
        chunk = order[a:b]
        plan.append([(s, np.array([i for t, i in chunk if t == s], dtype=np.int64))
                     for s in dict.fromkeys(t for t, _ in chunk)])
    return plan, points


@pytest.mark.slow
@settings(max_examples=150, deadline=None, derandomize=True)
@given(any_plan(), st.integers(2, 8))
def test_shard_plan_properties_on_any_plan(plan_and_points, world_size):
    check_shards(*plan_and_points, world_size)


def test_the_issue_case_nineteen_streamlines_with_one():
    "Issue #13.7: a step paired a batch of 19 streamlines with a batch of 1."
    plan = [[(0, np.arange(19))], [(1, np.array([0]))], [(1, np.array([1, 2]))], [(1, np.array([3, 4]))]]
    points = [np.full(19, 3.), np.array([3., 40, 40, 40, 40])]
    shards = check_shards(plan, points, 2)
    assert [[batch_points(b, points) for _, b in shard] for shard in shards] == [[30, 80], [30, 80]]
    assert sorted(len(np.concatenate([ids for _, ids in shard[0][1]])) for shard in shards) == [10, 10]


def test_last_step_of_an_epoch_is_balanced():
    "The leftover batch of 2 streamlines of 9 and 1 point cannot be dealt evenly alone: it is melted."
    plan = [[(0, np.array([0, 1, 2, 3]))], [(0, np.array([4, 5, 6, 7]))], [(0, np.array([8, 9]))]]
    points = [np.array([5., 5, 5, 5, 5, 5, 5, 5, 9, 1])]
    shards = check_shards(plan, points, 2)
    for step in range(len(shards[0])):
        assert spread([batch_points(shard[step][1], points) for shard in shards]) <= 1 + TOLERANCE


def test_when_ten_percent_is_impossible_the_best_deal():
    "3 streamlines of equal length for 2 ranks: 2 against 1 is the best there is."
    plan = [[(0, np.array([0, 1, 2]))]]
    shards = check_shards(plan, [np.array([4., 4, 4])], 2)
    assert sorted(len(shard[0][1][0][1]) for shard in shards) == [1, 2]


def test_single_process_plan_is_untouched():
    plan = [[(0, np.array([0, 1]))], [(0, np.array([2]))], [(0, np.array([3, 4, 5]))]]
    shards, dropped = shard_plan(plan, [np.array([1., 50, 2, 3, 4, 5])], 1)
    assert dropped == 0 and len(shards) == 1 and [b for b, _ in shards[0]] == [0, 1, 2]
    assert all(batch is plan[b] for b, batch in shards[0])


@pytest.mark.parametrize('world_size', [2, 3, 5])
def test_real_sampler_ranks_share_the_phantom_plan_evenly(phantom, world_size):
    "The real planner on the demo phantom: each rank's `rank_plan` is its shard, the steps even."
    ds = MultiSubjectDataset(phantom).load_data(progress=False)
    kw = dict(batch_size=400, batch_size_units='nb_points', step_size=1.0, seed=5, nb_subjects_per_batch=2)
    ranks = [BatchIDSampler(ds.training_set, 'streamlines', rank=r, world_size=world_size, **kw)
             for r in range(world_size)]
    single = BatchIDSampler(ds.training_set, 'streamlines', world_size=1, **kw)
    plan = [[(p[0], p[1]) for p in batch] for batch in single.epoch_plan(0)]
    shards = check_shards(plan, single._points, world_size)
    for r, sampler in enumerate(ranks):
        mine = sampler.rank_plan(0)
        assert len(mine) == len(shards[r]) == len(sampler)
        assert [part.batch_index for batch in mine for part in batch] == \
            [b for b, batch in shards[r] for _ in batch]
        assert [step for step, batch in enumerate(mine) for part in batch if part.step != step] == []
