"""Samplers as a planner + a loader, and augmentation as a list of transforms, on real HDF5 files
(the demo phantom's builder), the real dataset and real DataLoader workers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dwiml_nb.sampler as sampler_module
from dwiml_nb.augment import (TRANSFORMS, Noise, Resample, Reverse, Split, Transform, apply_transforms,
                              nb_points_for_step, register_transform, resample_step_size,
                              streamline_lengths_mm)
from dwiml_nb.contracts import BatchLoader as BatchLoaderProtocol, BatchPlanner, check_sampler
from dwiml_nb.core import ConfigError, PackedStreamlines
from dwiml_nb.data import make_phantom_database
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.hdf5 import create_hdf5_dataset
from dwiml_nb.sampler import (AbstractBatchSampler, BatchIDSampler, BatchLoader, BatchLoaderOneInput,
                              BatchStreamlinesSamplerOneInput, DWIMLAbstractBatchLoader, DWIMLBatchIDSampler,
                              DWIMLBatchLoaderOneInput, estimate_nb_points)

AUGMENT = dict(split_ratio=0.4, reverse_ratio=0.5, noise_gaussian_size=0.3)


@pytest.fixture(scope='module')
def phantom(tmp_path_factory):
    "A small demo phantom (resampled at 1 mm by the builder): its dataset, with the file's step on the subsets."
    folder = tmp_path_factory.mktemp('phantom')
    splits = make_phantom_database(folder / 'db', nb_subjects=6, nb_streamlines_per_bundle=12, progress=False)
    create_hdf5_dataset(folder / 'db', folder / 'phantom.hdf5', folder / 'db' / 'config.json', splits['training'],
                        splits['validation'], splits['testing'], step_size=1.0, progress=False)
    return MultiSubjectDataset(folder / 'phantom.hdf5').load_data(progress=False)


def training_set(phantom, with_stored_step=False):
    "The phantom's training set; without `with_stored_step`, as a subset that does not know the file's step."
    subset = MultiSubjectDataset(phantom.hdf5_file).load_data(progress=False).training_set
    assert (subset.step_size, subset.compress) == (phantom.step_size, phantom.compress)
    if not with_stored_step:
        subset.step_size = subset.compress = None
    return subset


def make(subset, **kw):
    kw = {'batch_size': 1500, 'batch_size_units': 'nb_points', 'nb_subjects_per_batch': 2, 'seed': 3, **kw}
    return BatchStreamlinesSamplerOneInput(subset, 'streamlines', 'input', **kw)


def same_batch(a, b):
    np.testing.assert_array_equal(a.streamlines.data, b.streamlines.data)
    np.testing.assert_array_equal(a.streamlines.lengths, b.streamlines.lengths)
    np.testing.assert_array_equal(a.streamline_ids, b.streamline_ids)
    np.testing.assert_array_equal(a.subject_ids, b.subject_ids)
    assert (a.inputs is None) == (b.inputs is None)
    if a.inputs is not None: torch.testing.assert_close(a.inputs, b.inputs, rtol=0, atol=0)
    assert sorted(a.augmentation) == sorted(b.augmentation)
    for k in a.augmentation: np.testing.assert_array_equal(a.augmentation[k], b.augmentation[k])


def test_samplers_are_a_planner_and_a_loader(phantom):
    sampler = make(training_set(phantom), step_size=0.7, **AUGMENT)
    assert isinstance(sampler, BatchPlanner) and isinstance(sampler, BatchLoaderProtocol)
    assert check_sampler(sampler) is sampler
    assert isinstance(sampler.planner, BatchIDSampler) and isinstance(sampler.planner, BatchPlanner)
    assert isinstance(sampler.loader, BatchLoaderOneInput) and isinstance(sampler.loader, BatchLoaderProtocol)
    assert not isinstance(sampler.loader, BatchPlanner)
    assert (DWIMLBatchIDSampler, DWIMLAbstractBatchLoader, DWIMLBatchLoaderOneInput) == \
        (BatchIDSampler, BatchLoader, BatchLoaderOneInput)
    assert isinstance(AbstractBatchSampler(sampler.source_data, 'streamlines', batch_size=5).loader, BatchLoader)


def test_a_planner_and_a_loader_on_their_own_make_the_samplers_batches(phantom):
    subset = training_set(phantom)
    sampler = make(subset, step_size=0.7, **AUGMENT)
    planner = BatchIDSampler(subset, 'streamlines', batch_size=1500, batch_size_units='nb_points',
                             nb_subjects_per_batch=2, seed=3, step_size=0.7)
    loader = BatchLoaderOneInput(subset, 'streamlines', 'input', seed=3, transforms=sampler.transforms)
    got = list(DataLoader(subset, batch_sampler=planner, collate_fn=loader.load_batch, num_workers=2))
    want = [sampler.load_batch(p) for p in sampler.epoch_plan(0)]
    assert len(got) == len(want) > 2
    for a, b in zip(got, want): same_batch(a, b)


def test_records_say_what_the_transforms_did(phantom):
    subset = training_set(phantom)
    plain = make(subset, step_size=0.7)
    augmented = make(subset, step_size=0.7, noise_gaussian_max=0.4, **AUGMENT)
    parts = next(p for p in plain.epoch_plan(0) if len(p) == 2)
    base, batch = plain.load_batch(parts), augmented.load_batch(parts)
    rec = batch.augmentation
    assert sorted(rec) == ['noise_mm', 'resampled', 'reversed', 'split'] and sorted(base.augmentation) == ['resampled']
    assert {len(v) for v in rec.values()} == {len(batch)} and rec['split'].dtype == np.int8
    assert rec['reversed'].dtype == bool and rec['noise_mm'].dtype == np.float32 and rec['resampled'].all()
    assert len(np.unique(batch.subject_ids)) == 2   # records concatenated over the subjects of the batch
    assert (rec['split'] == 1).sum() == (rec['split'] == 2).sum() == len(batch) - len(base) > 0
    voxel_sizes = subset.get_streamline_info(0, 'streamlines').voxel_sizes.astype(np.float64)
    for i in range(len(base)):   # each input streamline, from its halves, un-reversed
        rows = np.flatnonzero((batch.streamline_ids == base.streamline_ids[i]) & (batch.subject_ids == base.subject_ids[i]))
        halves = [batch.streamlines[j][::-1] if rec['reversed'][j] else batch.streamlines[j] for j in rows]
        assert rec['split'][rows].tolist() in ([0], [1, 2])
        moved = (np.concatenate(halves) - base.streamlines[i]) * voxel_sizes
        np.testing.assert_allclose(max(rec['noise_mm'][rows]), np.linalg.norm(moved, axis=1).max(), rtol=1e-5, atol=1e-6)
    assert 0 < rec['noise_mm'].max() <= 0.4 * np.sqrt(3) + 1e-5


def test_a_transforms_list_gives_the_same_batches_as_the_arguments(phantom):
    subset = training_set(phantom)
    by_kwargs = make(subset, nb_points=20, **AUGMENT)
    by_list = make(subset, transforms=[Resample(nb_points=20), Split(.4), Reverse(.5), Noise(.3)])
    assert by_list.get_params() == by_kwargs.get_params() and by_list.nb_points == 20
    for parts in by_kwargs.epoch_plan(1)[:4]: same_batch(by_list.load_batch(parts), by_kwargs.load_batch(parts))
    with pytest.raises(ConfigError, match='either as transforms= or as nb_points, reverse_ratio, not both'):
        make(subset, nb_points=12, reverse_ratio=.2, transforms=[Resample(nb_points=20)])
    with pytest.raises(ConfigError, match='Resample must come first'):
        make(subset, transforms=[Split(.3), Resample(step_size=1.)])


def test_a_checkpoint_rebuilds_the_transforms_by_name_only(phantom):
    from dwiml_nb.trainer import sampler_spec

    @register_transform
    class DropLastPoint(Transform):
        _params = ('min_points',)
        def __init__(self, min_points=3): self.min_points = int(min_points)
        def __call__(self, streams, rng, vox_to_mm):
            lengths = np.where(streams.lengths >= self.min_points, streams.lengths - 1, streams.lengths)
            return PackedStreamlines(streams.data, streams.offsets, lengths), {}

    try:
        subset = training_set(phantom)
        sampler = make(subset, transforms=[Resample(step_size=0.8), DropLastPoint(4), Split(.5)])
        params = json.loads(json.dumps(sampler_spec(sampler)['params']))   # as a checkpoint stores it
        assert params['transforms'][1] == {'name': 'DropLastPoint', 'min_points': 4} and params['split_ratio'] == .5
        rebuilt = BatchStreamlinesSamplerOneInput(subset, **params)
        for parts in sampler.epoch_plan(0)[:3]: same_batch(rebuilt.load_batch(parts), sampler.load_batch(parts))
        params['transforms'][1]['name'] = 'builtins.eval'
        with pytest.raises(ConfigError, match="unknown transform 'builtins.eval'"):
            BatchStreamlinesSamplerOneInput(subset, **params)
    finally:
        TRANSFORMS.pop('DropLastPoint', None)


def test_a_record_that_is_not_aligned_is_refused():
    streams = PackedStreamlines.from_sequence([np.zeros((3, 3)), np.ones((4, 3))])
    with pytest.raises(ConfigError, match="record.*'bad'"):
        apply_transforms([lambda s, rng, m: (s, {'bad': np.zeros(5)})], streams, np.random.default_rng(0), np.eye(3))


def test_a_shallow_copy_without_augmentation_leaves_the_original(phantom):
    import copy
    sampler = make(training_set(phantom), step_size=0.7, **AUGMENT)
    parts = sampler.epoch_plan(0)[0]
    before = sampler.load_batch(parts)
    variant = copy.copy(sampler)
    variant.split_ratio = variant.reverse_ratio = variant.noise_gaussian_size = 0.0
    variant.step_size = variant.nb_points = variant.compress = None
    assert variant.transforms == [] and len(sampler.transforms) == 4
    stored = PackedStreamlines.concatenate([sampler.source_data.get_streamlines(s, 'streamlines', ids) for s, ids in parts])
    np.testing.assert_array_equal(variant.load_batch(parts).streamlines.data, stored.data)
    same_batch(sampler.load_batch(parts), before)
    assert sampler.with_transforms([Reverse(1.)]).transforms == [Reverse(1.)] and len(sampler.transforms) == 4


def test_the_stored_step_is_not_redone(phantom):
    subset = training_set(phantom, with_stored_step=True)
    kept = make(subset, step_size=1.0 * (1 + 1e-8), split_ratio=.5)
    for parts in kept.epoch_plan(0)[:3]:
        batch = kept.load_batch(parts)
        assert not batch.augmentation['resampled'].any()
        stored = PackedStreamlines.concatenate([subset.get_streamlines(s, 'streamlines', ids) for s, ids in parts])
        np.testing.assert_array_equal(batch.streamlines.data, stored.data)   # the stored points, untouched
        assert batch.nb_points == sum(int(kept._points[s][ids].sum()) for s, ids in parts)   # the estimate is exact
    info = subset.get_streamline_info(0, 'streamlines')
    np.testing.assert_array_equal(estimate_nb_points(info.lengths, info.euclidean_lengths, 1.0, stored_step_size=1.0),
                                  info.lengths)
    # Another step, or a sampler that does not know the file's step: resampled, budget from the lengths.
    finer = make(subset, step_size=0.5)
    assert finer.load_batch(finer.epoch_plan(0)[0]).augmentation['resampled'].all()
    unaware = make(training_set(phantom), step_size=1.0)
    assert unaware.load_batch(unaware.epoch_plan(0)[0]).augmentation['resampled'].all()


def test_one_rule_for_the_number_of_points(phantom):
    subset = training_set(phantom)
    info = subset.get_streamline_info(0, 'streamlines')
    streams = subset.get_streamlines(0, 'streamlines', np.arange(len(info.lengths)))
    got = resample_step_size(streams, 0.6, info.affine).lengths
    arc = streamline_lengths_mm(streams, info.affine)
    np.testing.assert_array_equal(got, np.where(streams.lengths >= 2, nb_points_for_step(arc, 0.6), streams.lengths))
    estimate = estimate_nb_points(info.lengths, info.euclidean_lengths, 0.6)
    assert (got <= estimate).all() and (estimate - got).max() <= 1


def test_inputs_written_with_out_are_the_same(phantom, monkeypatch):
    subset = training_set(phantom)
    sampler = make(subset, step_size=0.7, neighborhood_type='axes', neighborhood_radius=1, **AUGMENT)
    parts = [p for p in sampler.epoch_plan(0) if len(p) == 2][:2]
    want = [sampler.load_batch(p) for p in parts]
    calls = []

    def with_out(function):
        def interpolate(*args, out=None, **kw):
            result = function(*args, **kw)
            calls.append(out is not None)
            return result if out is None else out.copy_(result)
        return interpolate

    monkeypatch.setattr(sampler_module, 'trilinear_interpolation', with_out(sampler_module.trilinear_interpolation))
    monkeypatch.setattr(sampler_module, 'interpolate_with_neighborhood',
                        with_out(sampler_module.interpolate_with_neighborhood))
    monkeypatch.setattr(sampler_module, '_INTERPOLATION_TAKES_OUT', True)
    for p, w in zip(parts, want): same_batch(sampler.load_batch(p), w)
    assert calls and all(calls)
