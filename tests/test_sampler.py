"""The batch samplers on real HDF5 files, the real dataset and real DataLoader worker processes.

Reference implementations are the slow obvious ones: one h5py read per streamline
(`dwiml_nb.testing.read_streamlines_slowly`), dipy's `set_number_of_points`, a per-point trilinear
interpolation in plain numpy.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dipy.tracking.streamlinespeed import set_number_of_points
from torch.utils.data import DataLoader

from dwiml_nb.testing import read_streamlines_slowly, write_dwiml_hdf5  # noqa: E402

from dwiml_nb.core import ConfigError  # noqa: E402
from dwiml_nb.dataset import MultiSubjectDataset  # noqa: E402
from dwiml_nb.sampler import (AbstractBatchSampler, BatchPart, BatchStreamlinesSamplerOneInput,  # noqa: E402
                              StreamlineBatch, estimate_nb_points)

AUGMENT = dict(split_ratio=0.3, reverse_ratio=0.5, noise_gaussian_size=0.3)


@pytest.fixture(scope='module')
def hdf5_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('sampler') / 'data.hdf5'
    # Training subjects sub-03 (25 streamlines), sub-01 (60) and sub-05 (3: fewer than a batch asks).
    truth = write_dwiml_hdf5(path, training=('sub-03', 'sub-01', 'sub-05'), dims=(9, 10, 8),
                             nb_streamlines=(40, 25, 60, 3, 12))
    return path, truth


@pytest.fixture(scope='module', params=[False, True], ids=['ram', 'lazy'])
def training_set(request, hdf5_file):
    return MultiSubjectDataset(hdf5_file[0], lazy=request.param).load_data(progress=False).training_set


def fresh_set(path, lazy=False):
    return MultiSubjectDataset(path, lazy=lazy).load_data(progress=False).training_set


def make_sampler(subset, **kw):
    kw = {'batch_size': 150, 'batch_size_units': 'nb_points', 'step_size': 0.8, 'nb_subjects_per_batch': 2,
          'seed': 7, **AUGMENT, **kw}
    return BatchStreamlinesSamplerOneInput(subset, 'streamlines', 'input', **kw)


def run_loader(sampler, num_workers, **kw):
    loader = DataLoader(sampler.source_data, batch_sampler=sampler, collate_fn=sampler.load_batch,
                        num_workers=num_workers, **kw)
    return list(loader)


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.epoch, a.batch_index) == (b.epoch, b.batch_index)
        np.testing.assert_array_equal(a.streamlines.data, b.streamlines.data)
        np.testing.assert_array_equal(a.streamlines.lengths, b.streamlines.lengths)
        np.testing.assert_array_equal(a.subject_ids, b.subject_ids)
        np.testing.assert_array_equal(a.streamline_ids, b.streamline_ids)
        torch.testing.assert_close(a.inputs, b.inputs, rtol=0, atol=0)


def trilinear_slow(volume, point):
    "Per-point trilinear interpolation, corner origin (voxel i's centre at i + 0.5), clamped to the border voxels."
    dims = np.array(volume.shape[:3])
    x = np.clip(np.asarray(point, np.float64) - 0.5, 0, dims - 1)
    lo = np.minimum(np.floor(x).astype(int), dims - 1)
    hi = np.minimum(lo + 1, dims - 1)
    t = x - lo
    out = np.zeros(volume.shape[3])
    for corner in range(8):
        pick = [(corner >> axis) & 1 for axis in range(3)]
        idx = tuple(hi[a] if pick[a] else lo[a] for a in range(3))
        w = np.prod([t[a] if pick[a] else 1 - t[a] for a in range(3)])
        out += w * volume[idx]
    return out


# --- determinism ----------------------------------------------------------------------------

def test_same_batches_whatever_the_number_of_workers(training_set):
    reference = run_loader(make_sampler(training_set), 0)
    assert len(reference) > 3 and all(isinstance(b, StreamlineBatch) for b in reference)
    for workers in (1, 2):
        assert_same_batches(run_loader(make_sampler(training_set), workers), reference)


def test_same_batches_in_spawned_workers(hdf5_file):
    # spawn pickles the sampler and the (lazy) dataset: what a worker unpickles must load the same.
    subset = fresh_set(hdf5_file[0], lazy=True)
    reference = run_loader(make_sampler(subset, max_batches_per_epoch=4), 0)
    got = run_loader(make_sampler(subset, max_batches_per_epoch=4), 1, multiprocessing_context='spawn')
    assert_same_batches(got, reference)


def test_ram_and_lazy_give_the_same_batches(hdf5_file):
    ram = run_loader(make_sampler(fresh_set(hdf5_file[0])), 0)
    lazy = run_loader(make_sampler(fresh_set(hdf5_file[0], lazy=True)), 0)
    assert_same_batches(lazy, ram)


def test_epochs_and_seeds_differ(hdf5_file):
    subset = fresh_set(hdf5_file[0])
    sampler = make_sampler(subset)
    first = [[(s, ids.tolist()) for s, ids in b] for b in sampler.epoch_plan(0)]
    second = [[(s, ids.tolist()) for s, ids in b] for b in sampler.epoch_plan(1)]
    other_seed = [[(s, ids.tolist()) for s, ids in b] for b in make_sampler(subset, seed=8).epoch_plan(0)]
    assert first != second and first != other_seed
    # same streamlines in the same batch position, other epoch: other augmentation
    part = sampler.epoch_plan(0)[0]
    moved = [BatchPart(s, ids, epoch=1, batch_index=0) for s, ids in part]
    a, b = sampler.load_batch(part), sampler.load_batch(moved)
    assert a.streamlines.data.shape != b.streamlines.data.shape or not np.array_equal(a.streamlines.data,
                                                                                      b.streamlines.data)


def test_every_streamline_once_per_epoch_and_no_empty_batch(training_set):
    sampler = make_sampler(training_set, nb_subjects_per_batch=3)
    plan = sampler.epoch_plan(3)
    assert len(sampler) == len(plan) == len(list(sampler))
    for s in range(len(training_set.subjects)):
        ids = np.concatenate([i for b in plan for t, i in b if t == s] or [np.zeros(0, np.int64)])
        np.testing.assert_array_equal(np.sort(ids), np.arange(training_set.nb_streamlines(s, 'streamlines')))
    for b, batch in enumerate(plan):
        assert batch and all(len(part[1]) > 0 for part in batch)
        assert all((part.epoch, part.batch_index) == (3, b) for part in batch)
        assert len({part[0] for part in batch}) == len(batch) <= 3


# --- resume ---------------------------------------------------------------------------------

@pytest.mark.parametrize('k', [0, 1, 4])
def test_resume_after_k_batches_continues_exactly(hdf5_file, k):
    path = hdf5_file[0]
    sampler = make_sampler(fresh_set(path))
    sampler.set_epoch(2)
    everything = run_loader(sampler, 0)
    it = iter(sampler)
    for _ in range(k):
        next(it)
    state = pickle.loads(pickle.dumps(sampler.state_dict()))   # as saved in a checkpoint
    assert state['next_batch'] == k and state['epoch'] == 2

    resumed = make_sampler(fresh_set(path))   # a new process: new dataset, new sampler
    resumed.load_state_dict(state)
    resumed.set_epoch(2)                      # the trainer calls it at the top of the epoch
    assert_same_batches(run_loader(resumed, 2), everything[k:])


def test_state_dict_with_the_trainers_position(hdf5_file):
    # A DataLoader reads the batch sampler ahead: the trainer passes the last batch it trained on.
    sampler = make_sampler(fresh_set(hdf5_file[0]))
    loader = DataLoader(sampler.source_data, batch_sampler=sampler, collate_fn=sampler.load_batch, num_workers=2)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 2:
            state = sampler.state_dict(next_batch=batch.batch_index + 1)
    resumed = make_sampler(fresh_set(hdf5_file[0]))
    resumed.load_state_dict(state)
    assert_same_batches(run_loader(resumed, 0), batches[2:])


def test_load_state_dict_refuses_a_foreign_state(hdf5_file):
    sampler = make_sampler(fresh_set(hdf5_file[0]))
    with pytest.raises(ConfigError, match='seed'):
        sampler.load_state_dict({**sampler.state_dict(), 'seed': 99})
    with pytest.raises(ConfigError, match='batches'):
        sampler.load_state_dict({**sampler.state_dict(), 'nb_batches': 1000})
    with pytest.raises(ConfigError, match='outside'):
        sampler.load_state_dict({**sampler.state_dict(), 'next_batch': len(sampler) + 1})


# --- budgets --------------------------------------------------------------------------------

@pytest.mark.parametrize('resampling', [dict(step_size=0.8), dict(nb_points=12), dict()])
def test_nb_points_budget_is_honoured(hdf5_file, resampling):
    subset = fresh_set(hdf5_file[0])
    budget = 60
    resampling = {'step_size': None, **resampling}
    sampler = make_sampler(subset, batch_size=budget, **resampling)
    for batch in run_loader(sampler, 0):
        assert len(batch) > 0
        if batch.nb_points > budget:   # only a lone streamline longer than the budget (maybe split in two)
            assert len(np.unique(batch.streamline_ids)) == 1
    without_split = make_sampler(subset, batch_size=budget, split_ratio=0, **resampling)
    for parts in without_split.epoch_plan(0):
        loaded = without_split.load_batch(parts)
        estimate = sum(estimate_nb_points(without_split._infos[s].lengths[ids],
                                          without_split._infos[s].euclidean_lengths[ids], **resampling).sum()
                       for s, ids in parts)
        assert loaded.nb_points <= estimate


def test_single_streamline_batches_for_streamlines_over_budget(hdf5_file):
    subset = fresh_set(hdf5_file[0])
    lengths = np.concatenate([subset.get_streamline_info(s, 'streamlines').lengths for s in range(3)])
    budget = int(np.percentile(lengths, 30))   # most streamlines are longer than the whole budget
    sampler = make_sampler(subset, batch_size=budget, step_size=None, split_ratio=0)
    plan = sampler.epoch_plan(0)
    singles = 0
    for parts in plan:
        points = sum(lengths_of(subset, s, ids).sum() for s, ids in parts)
        if points > budget:
            assert len(parts) == 1 and len(parts[0][1]) == 1
            singles += 1
    assert singles == (lengths > budget).sum()


def lengths_of(subset, s, ids):
    return subset.get_streamline_info(s, 'streamlines').lengths[ids]


def test_length_mm_budget_is_honoured(hdf5_file):
    subset = fresh_set(hdf5_file[0])
    sampler = make_sampler(subset, batch_size=40., batch_size_units='length_mm', nb_subjects_per_batch=None)
    for parts in sampler.epoch_plan(0):
        mm = sum(subset.get_streamline_info(s, 'streamlines').euclidean_lengths[ids].sum() for s, ids in parts)
        assert mm <= 40. + 1e-9 or (len(parts) == 1 and len(parts[0][1]) == 1)


def test_nb_streamlines_budget_and_small_subject(hdf5_file):
    # sub-05 has 3 streamlines; each of 3 subjects is asked for 10 per batch.
    subset = fresh_set(hdf5_file[0])
    sampler = make_sampler(subset, batch_size=30, batch_size_units='nb_streamlines', nb_subjects_per_batch=None,
                           split_ratio=0)
    batches = run_loader(sampler, 0)
    assert all(0 < len(b) <= 30 for b in batches)
    small = subset.subjects.index('sub-05')
    assert sum((b.subject_ids == small).sum() for b in batches) == 3
    assert sum(len(b) for b in batches) == sum(subset.nb_streamlines(s, 'streamlines') for s in range(3))


def test_cycles_weights_and_max_batches(hdf5_file):
    subset = fresh_set(hdf5_file[0])
    plan = make_sampler(subset, nb_subjects_per_batch=1, cycles=3, batch_size=40).epoch_plan(0)
    subjects = [b[0][0] for b in plan]
    assert all(len(b) == 1 for b in plan)
    # A new subject is drawn every 3 batches, or earlier when the current one runs out.
    changes = [i for i in range(1, len(subjects)) if subjects[i] != subjects[i - 1]]
    for i in changes:
        run_start = max([c for c in changes if c < i], default=0)
        assert (i - run_start) % 3 == 0 or _exhausted_at(plan, subjects[i - 1], i, subset)
    never = make_sampler(subset, subject_weights=[1, 0, 1]).epoch_plan(0)
    assert all(s != 1 for b in never for s, _ in b)
    assert len(make_sampler(subset, max_batches_per_epoch=2)) == 2


def _exhausted_at(plan, subject, i, subset):
    used = sum(len(ids) for b in plan[:i] for s, ids in b if s == subject)
    return used == subset.nb_streamlines(subject, 'streamlines')


# --- what load_batch loads, against slow references -------------------------------------

def test_load_batch_matches_per_streamline_reads_and_dipy(hdf5_file):
    path, _ = hdf5_file
    subset = fresh_set(path, lazy=True)
    sampler = make_sampler(subset, nb_points=9, step_size=None, split_ratio=0, reverse_ratio=0,
                           noise_gaussian_size=0)
    for parts in sampler.epoch_plan(0)[:3]:
        batch = sampler.load_batch(parts)
        want = [set_number_of_points(s.astype(np.float64), 9)
                for subj, ids in parts for s in read_streamlines_slowly(path, subset.subjects[subj], 'streamlines', ids)]
        assert len(batch) == len(want)
        for got, w in zip(batch.streamlines, want):
            np.testing.assert_allclose(got, w, atol=1e-4)
        np.testing.assert_array_equal(batch.streamline_ids, np.concatenate([ids for _, ids in parts]))
        np.testing.assert_array_equal(batch.subject_ids, np.concatenate([np.full(len(i), s) for s, i in parts]))


def test_augmentations_do_what_they_say(hdf5_file):
    path, _ = hdf5_file
    subset = fresh_set(path)
    plain = make_sampler(subset, split_ratio=0, reverse_ratio=0, noise_gaussian_size=0)
    parts = plain.epoch_plan(0)[0]
    base = plain.load_batch(parts)

    reversed_ = make_sampler(subset, split_ratio=0, reverse_ratio=1, noise_gaussian_size=0).load_batch(parts)
    for a, b in zip(reversed_.streamlines, base.streamlines):
        np.testing.assert_array_equal(a, b[::-1])

    split = make_sampler(subset, split_ratio=1, reverse_ratio=0, noise_gaussian_size=0).load_batch(parts)
    np.testing.assert_array_equal(split.streamlines.data, base.streamlines.data)   # every point kept
    assert len(split) > len(base)
    np.testing.assert_array_equal(np.unique(split.streamline_ids), np.unique(base.streamline_ids))
    for sid in base.streamline_ids:
        halves = [s for s, i in zip(split.streamlines, split.streamline_ids) if i == sid]
        np.testing.assert_array_equal(np.concatenate(halves), base.streamlines[list(base.streamline_ids).index(sid)])

    noisy = make_sampler(subset, split_ratio=0, reverse_ratio=0, noise_gaussian_size=0.3,
                         noise_gaussian_max=0.5).load_batch(parts)
    moved_mm = (noisy.streamlines.data - base.streamlines.data) * subset.get_streamline_info(0, 'streamlines').voxel_sizes
    assert np.abs(moved_mm).max() <= 0.5 + 1e-4 and np.abs(moved_mm).max() > 0.1
    assert 0.2 < moved_mm.std() < 0.35


def test_inputs_are_the_volume_under_the_augmented_points(hdf5_file):
    path, truth = hdf5_file
    subset = fresh_set(path, lazy=True)
    sampler = make_sampler(subset)
    batch = sampler.load_batch(sampler.epoch_plan(0)[1])
    assert batch.inputs.shape == (batch.nb_points, 4) and batch.inputs.dtype == torch.float32
    point_subject = np.repeat(batch.subject_ids, batch.streamlines.lengths)
    for i in range(0, batch.nb_points, 7):
        volume = truth['subjects'][subset.subjects[point_subject[i]]]['input']['data']
        np.testing.assert_allclose(batch.inputs[i].numpy(), trilinear_slow(volume, batch.streamlines.data[i]),
                                   rtol=1e-4, atol=1e-4)
    per_streamline = batch.inputs_per_streamline()
    assert [len(t) for t in per_streamline] == batch.streamlines.lengths.tolist()


@pytest.mark.parametrize('kind,radius,units', [('axes', 1, 'vox'), ('grid', 1, 'mm'), ('axes', 2, 'mm')])
def test_inputs_with_a_neighborhood(hdf5_file, kind, radius, units):
    from dwiml_nb.interpolation import neighborhood_offsets
    path, truth = hdf5_file
    subset = fresh_set(path)
    sampler = make_sampler(subset, neighborhood_type=kind, neighborhood_radius=radius, neighborhood_units=units,
                           neighborhood_resolution=0.9)
    batch = sampler.load_batch(sampler.epoch_plan(0)[0])
    nb_features = 4
    point_subject = np.repeat(batch.subject_ids, batch.streamlines.lengths)
    for i in range(0, batch.nb_points, 11):
        subj = subset.subjects[point_subject[i]]
        volume = truth['subjects'][subj]['input']['data']
        offsets = neighborhood_offsets(kind, radius, 0.9, units, np.asarray(truth['subjects'][subj]['input']['voxres'],
                                                                          np.float64))
        assert batch.inputs.shape[1] == nb_features * len(offsets) == sampler.nb_inputs
        want = np.concatenate([trilinear_slow(volume, batch.streamlines.data[i] + o) for o in offsets])
        np.testing.assert_allclose(batch.inputs[i].numpy(), want, rtol=1e-4, atol=1e-4)


def test_batch_moves_to_a_device(hdf5_file):
    sampler = make_sampler(fresh_set(hdf5_file[0]), device='cpu')
    batch = sampler.load_batch(sampler.epoch_plan(0)[0]).to('cpu')
    tensors = batch.streamlines_as_tensors('cpu')
    assert len(tensors) == len(batch) and all(t.shape[1] == 3 for t in tensors)
    pinned = run_loader(make_sampler(fresh_set(hdf5_file[0]), max_batches_per_epoch=1), 0,
                        pin_memory=torch.cuda.is_available())
    assert isinstance(pinned[0], StreamlineBatch)


# --- bad input: refused at construction ------------------------------------------------------

@pytest.mark.parametrize('kw,message', [
    (dict(streamline_group='tracts'), "group 'tracts'.*no such group.*'streamlines'"),
    (dict(streamline_group='wm_mask'), "group 'wm_mask'.*is a volume group"),
    (dict(input_group='streamlines'), "group 'streamlines'.*is a streamlines group"),
    (dict(input_group='t1'), "group 't1'.*no such group"),
    (dict(batch_size=1), 'smaller than every streamline'),
    (dict(batch_size=-5), 'batch_size must be'),
    (dict(batch_size=2.5, batch_size_units='nb_streamlines'), 'batch_size must be an integer'),
    (dict(batch_size_units='points'), 'batch_size_units'),
    (dict(split_ratio=-0.1), 'split_ratio'),
    (dict(reverse_ratio=-0.5), 'reverse_ratio'),
    (dict(noise_gaussian_size=-1), 'noise_gaussian_size'),
    (dict(noise_gaussian_max=0), 'noise_gaussian_max'),
    (dict(step_size=1., nb_points=10), 'at most one'),
    (dict(nb_subjects_per_batch=0), 'nb_subjects_per_batch'),
    (dict(subject_weights=[1, -1, 1]), 'subject_weights'),
    (dict(subject_weights=[0, 0, 0]), 'subject_weights'),
    (dict(neighborhood_type='sphere', neighborhood_radius=1), 'neighborhood_type'),
    (dict(neighborhood_type='axes', neighborhood_radius=-1), 'neighborhood_radius'),
    (dict(neighborhood_type='axes', neighborhood_radius=0), 'neighborhood_radius'),
    (dict(neighborhood_type='axes', neighborhood_radius=1.5), 'neighborhood_radius'),
    (dict(neighborhood_radius=2), 'neighborhood_radius'),
    (dict(neighborhood_type='grid', neighborhood_radius=1, neighborhood_resolution=0), 'neighborhood_resolution'),
    (dict(neighborhood_type='axes', neighborhood_radius=20), 'beyond a volume'),
    (dict(neighborhood_type='axes', neighborhood_radius=1, neighborhood_units='cm'), 'neighborhood_units'),
])
def test_bad_configuration_is_refused_at_construction(hdf5_file, kw, message):
    subset = fresh_set(hdf5_file[0])
    args = {'streamline_group': 'streamlines', 'input_group': 'input'}
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    kw = {'batch_size': 150, 'batch_size_units': 'nb_points', **kw}
    with pytest.raises(ConfigError, match=message):
        BatchStreamlinesSamplerOneInput(subset, args['streamline_group'], args['input_group'], **kw)


def test_abstract_sampler_has_no_inputs(hdf5_file):
    sampler = AbstractBatchSampler(fresh_set(hdf5_file[0]), 'streamlines', batch_size=10)
    batch = run_loader(sampler, 2)[0]
    assert batch.inputs is None and batch.inputs_per_streamline() is None and 0 < len(batch) <= 10


# --- rebuilding, and the benchmark still runs -------------------------------------------------

def test_get_params_rebuilds_the_same_sampler(hdf5_file):
    from dwiml_nb.trainer import sampler_spec
    subset = fresh_set(hdf5_file[0])
    sampler = make_sampler(subset, neighborhood_type='grid', neighborhood_radius=1, subject_weights=[1, 2, 1])
    params = sampler_spec(sampler)['params']   # what a checkpoint stores (JSON-safe)
    rebuilt = BatchStreamlinesSamplerOneInput(subset, **params)
    assert_same_batches([rebuilt.load_batch(p) for p in rebuilt.epoch_plan(1)[:3]],
                        [sampler.load_batch(p) for p in sampler.epoch_plan(1)[:3]])


@pytest.mark.slow
def test_the_loader_benchmark_reports_both_neighbourhoods():
    "bench_loader --quick --json: every neighbourhood measured, with its baseline and the worker ratio."
    import json
    script = Path(__file__).parents[1] / 'benchmarks' / 'bench_loader.py'
    run = subprocess.run([sys.executable, str(script), '--quick', '--json'], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout)['rows']
    assert sorted(r['neighborhood'].split()[0] for r in rows) == ['axes', 'none']
    for r in rows:
        assert r['points_per_cpu_s'] > 0 and r['baseline_points_per_cpu_s'] > 0 and r['workers_ratio'] > 0


