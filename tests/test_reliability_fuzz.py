"""Property tests (hypothesis) over the HDF5 builder and the samplers: random small datasets, budgets,
ratios and neighborhoods. No crash; budgets honoured; every sampled id valid; round trips exact.

Examples are few (the files are real) and deterministic (`derandomize=True`), so the suite is fast
and a failure reproduces.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from dipy.io.streamline import load_tractogram
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwiml_nb.core import ConfigError
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.hdf5 import create_hdf5_dataset, open_dwiml_hdf5
from dwiml_nb.sampler import AbstractBatchSampler, BatchStreamlinesSamplerOneInput, estimate_nb_points

from dwiml_nb.testing import write_dwiml_hdf5  # noqa: E402
from dwiml_nb.testing import make_affine, random_streamlines, write_nifti, write_tractogram  # noqa: E402

FUZZ = settings(max_examples=20, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------
# The builder: random subjects on disk -> HDF5 -> exactly what dipy reads from the same files

@st.composite
def databases(draw):
    nb_subjects = draw(st.integers(1, 3))
    nb_features = draw(st.integers(1, 3))   # one per database: the builder refuses a mix (tested below)
    subjects = []
    for i in range(nb_subjects):
        dims = tuple(draw(st.lists(st.integers(2, 7), min_size=3, max_size=3)))
        voxel_sizes = tuple(draw(st.lists(st.sampled_from([0.5, 1.0, 1.25, 2.0]), min_size=3, max_size=3)))
        counts = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
        subjects.append({'name': f'sub-{i:02d}', 'dims': dims, 'voxel_sizes': voxel_sizes, 'counts': counts,
                         'nb_features': nb_features, 'flip_x': draw(st.booleans()),
                         'max_points': draw(st.integers(2, 12))})
    resampling = draw(st.sampled_from([{}, {'nb_points': 5}, {'step_size': 0.7}, {'compress': 0.2}]))
    return {'subjects': subjects, 'resampling': resampling, 'seed': draw(st.integers(0, 2 ** 16))}


def write_database(root, spec):
    rng = np.random.default_rng(spec['seed'])
    truth = {}
    for s in spec['subjects']:
        affine = make_affine(s['voxel_sizes'], origin=rng.uniform(-20, 20, 3), flip_x=s['flip_x'])
        subj_dir = root / s['name']
        volume = rng.normal(size=(*s['dims'], s['nb_features'])).astype(np.float32)
        write_nifti(subj_dir / 'dwi.nii.gz', volume, affine)
        files = []
        for k, n in enumerate(s['counts']):
            path = subj_dir / f'tracts/t{k}.trk'
            sl = random_streamlines(rng, n, s['dims'], max_points=s['max_points'])
            write_tractogram(path, sl, affine, s['dims'], dps={'w': rng.uniform(size=n)})
            files.append(path)
        truth[s['name']] = {'volume': volume, 'files': files}
    config = {'input': {'type': 'volume', 'files': ['dwi.nii.gz'], 'standardization': 'none'},
              'streamlines': {'type': 'streamlines', 'files': ['tracts/*.trk'], 'dps_keys': ['w']}}
    return config, truth


@pytest.mark.slow
@FUZZ
@given(spec=databases())
def test_builder_round_trip_is_exact(spec):
    root = Path(tempfile.mkdtemp(prefix='fuzz-build-'))
    try:
        config, truth = write_database(root / 'db', spec)
        names = [s['name'] for s in spec['subjects']]
        out = create_hdf5_dataset(root / 'db', root / 'out.hdf5', config, names[:1], names[1:], [], progress=False,
                                  **spec['resampling'])
        with open_dwiml_hdf5(out) as f:
            for name, t in truth.items():
                np.testing.assert_array_equal(f[f'{name}/input/data'][()], t['volume'])
                g = f[f'{name}/streamlines']
                data, offsets, lengths = g['data'][()], g['offsets'][()], g['lengths'][()]
                assert (lengths >= 2).all() and np.array_equal(offsets, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
                assert offsets[-1] + lengths[-1] == len(data)
                assert np.isfinite(data).all() and (data >= -1e-3).all() and (data <= np.array(g.attrs['dimensions']) + 1e-3).all()
                expected_n = sum(len(load_tractogram(str(p), 'same', bbox_valid_check=False)) for p in t['files'])
                assert len(lengths) == expected_n   # nothing dropped, nothing added
                if not spec['resampling']:
                    # the slow obvious reference: dipy reads each file, moves it to voxel/corner space
                    sfts = [load_tractogram(str(p), 'same', bbox_valid_check=False) for p in t['files']]
                    for sft in sfts: sft.to_vox(); sft.to_corner()
                    want = [s for sft in sfts for s in sft.streamlines]
                    np.testing.assert_array_equal(lengths, [len(s) for s in want])
                    if want: np.testing.assert_array_equal(data, np.concatenate(want))
                    np.testing.assert_array_equal(g['data_per_streamline/w'][()].ravel(),
                                                  np.concatenate([sft.data_per_streamline['w'].ravel() for sft in sfts]))
                elif 'nb_points' in spec['resampling']:
                    assert (lengths == 5).all()
        # and MultiSubjectDataset reads it back unchanged, RAM and lazy alike
        for lazy in (False, True):
            ds = MultiSubjectDataset(out, lazy=lazy).load_data(progress=False)
            with open_dwiml_hdf5(out) as f:
                for subset in (ds.training_set, ds.validation_set):
                    for i, name in enumerate(subset.subjects):
                        n = subset.nb_streamlines(i, 'streamlines')
                        got = subset.get_streamlines(i, 'streamlines', np.arange(n)[::-1])
                        want = f[f'{name}/streamlines/data'][()].astype(np.float32)
                        np.testing.assert_array_equal(np.concatenate(list(got)[::-1]), want)
            ds.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The samplers: random datasets, budgets, ratios and neighborhoods

@pytest.fixture(scope='module')
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('fuzz-sampler')


@st.composite
def sampler_cases(draw):
    nb_training = draw(st.integers(1, 3))
    units = draw(st.sampled_from(['nb_streamlines', 'nb_points', 'length_mm']))
    budget = {'nb_streamlines': draw(st.integers(1, 30)), 'nb_points': draw(st.integers(2, 200)),
              'length_mm': draw(st.floats(0.5, 60.))}[units]
    neighborhood = draw(st.sampled_from([(None, 0), ('axes', 1), ('grid', 1), ('axes', 2)]))
    return {
        'nb_streamlines': draw(st.lists(st.integers(1, 30), min_size=nb_training + 1, max_size=nb_training + 1)),
        'nb_training': nb_training, 'dims': tuple(draw(st.lists(st.integers(3, 8), min_size=3, max_size=3))),
        'seed': draw(st.integers(0, 1000)), 'units': units, 'budget': budget,
        'nb_subjects_per_batch': draw(st.sampled_from([None, 1, 2])),
        'split_ratio': draw(st.sampled_from([0., 0.5, 1.])), 'reverse_ratio': draw(st.sampled_from([0., 0.5, 1.])),
        'noise': draw(st.sampled_from([0., 0.3])),
        'resampling': draw(st.sampled_from([{}, {'step_size': 0.6}, {'nb_points': 4}])),
        'neighborhood': neighborhood, 'with_inputs': draw(st.booleans()), 'lazy': draw(st.booleans()),
    }


def batch_cost(info, ids, units, resampling):
    if units == 'nb_streamlines': return len(ids)
    if units == 'length_mm': return float(info.euclidean_lengths[ids].sum())
    return int(estimate_nb_points(info.lengths[ids], info.euclidean_lengths[ids], **resampling).sum())


@pytest.mark.slow
@FUZZ
@given(case=sampler_cases())
def test_sampler_plans_and_batches_honour_their_contract(fuzz_dir, case):
    training = tuple(f'sub-{i}' for i in range(case['nb_training']))
    path = fuzz_dir / f"{hashlib.sha1(str(sorted(case.items())).encode()).hexdigest()[:16]}.hdf5"
    if not path.exists():
        write_dwiml_hdf5(path, training=training, validation=('sub-v',), testing=(), dims=case['dims'],
                         nb_streamlines=case['nb_streamlines'], seed=case['seed'])
    subset = MultiSubjectDataset(path, lazy=case['lazy']).load_data(progress=False).training_set
    kw = dict(batch_size=case['budget'], batch_size_units=case['units'],
              nb_subjects_per_batch=case['nb_subjects_per_batch'], seed=case['seed'],
              split_ratio=case['split_ratio'], reverse_ratio=case['reverse_ratio'],
              noise_gaussian_size=case['noise'], **case['resampling'])
    infos = [subset.get_streamline_info(s, 'streamlines') for s in range(len(subset))]
    kind, radius = case['neighborhood']
    nb_neighbors = {None: 1, 'axes': 6 * radius + 1, 'grid': (2 * radius + 1) ** 3}[kind]
    try:
        if case['with_inputs']:
            sampler = BatchStreamlinesSamplerOneInput(subset, 'streamlines', 'input', neighborhood_type=kind,
                                                      neighborhood_radius=radius, **kw)
        else:
            sampler = AbstractBatchSampler(subset, 'streamlines', **kw)
    except ConfigError as e:
        # the one refusal a valid dataset may get: a budget that no single streamline fits in
        assert 'is smaller than every streamline' in str(e)
        smallest = min(batch_cost(info, np.array([i]), case['units'], case['resampling'])
                       for info in infos for i in range(len(info.lengths)))
        assert case['budget'] < smallest
        return
    plan = sampler.epoch_plan(0)
    seen = [[] for _ in infos]
    for parts in plan:
        assert parts, 'empty batch'
        if case['nb_subjects_per_batch']:
            assert len({s for s, _ in parts}) <= case['nb_subjects_per_batch']
        cost = 0
        for s, ids in parts:
            assert 0 <= s < len(infos) and ids.dtype == np.int64
            assert ((ids >= 0) & (ids < len(infos[s].lengths))).all()          # every id valid
            seen[s].extend(ids.tolist())
            cost += batch_cost(infos[s], ids, case['units'], case['resampling'])
        lone = len(parts) == 1 and len(parts[0][1]) == 1
        assert cost <= case['budget'] + 1e-9 or lone                           # budget honoured
    for s, ids in enumerate(seen):                                             # every streamline once an epoch
        assert sorted(ids) == list(range(len(infos[s].lengths)))
    for parts in plan[:3]:
        batch = sampler.load_batch(parts)
        n_ids = sum(len(ids) for _, ids in parts)
        assert n_ids <= len(batch) <= 2 * n_ids                                 # a split adds at most one each
        assert batch.streamlines.nb_points == len(batch.streamlines.data) and (batch.streamlines.lengths >= 1).all()
        assert np.isfinite(batch.streamlines.data).all()
        if 'nb_points' in case['resampling'] and case['split_ratio'] == 0:
            assert (batch.streamlines.lengths == 4).all()
        if case['with_inputs']:
            f = subset.nb_features['input']
            assert tuple(batch.inputs.shape) == (batch.streamlines.nb_points, f * nb_neighbors)
            assert bool(np.isfinite(batch.inputs.numpy()).all())
        else:
            assert batch.inputs is None
    # and a resumed sampler continues with exactly the remaining batches
    if len(plan) > 1:
        state = sampler.state_dict()
        state.update(epoch=0, next_batch=1)
        again = (BatchStreamlinesSamplerOneInput if case['with_inputs'] else AbstractBatchSampler)(
            subset, 'streamlines', *(['input'] if case['with_inputs'] else []), **kw)
        again.load_state_dict(state)
        rest = list(again)
        assert len(rest) == len(plan) - 1
        for a, b in zip(rest, plan[1:]):
            assert [(s, ids.tolist()) for s, ids in a] == [(s, ids.tolist()) for s, ids in b]


@FUZZ
@given(batch_size=st.one_of(st.integers(-3, 0), st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not x > 0)),
       ratio=st.one_of(st.floats(-2, -1e-9), st.floats(1 + 1e-9, 5), st.just(float('nan'))))
@pytest.mark.slow
def test_sampler_refuses_nonsense_with_a_config_error(fuzz_dir, batch_size, ratio):
    path = fuzz_dir / 'refuse.hdf5'
    if not path.exists():
        write_dwiml_hdf5(path)
    subset = MultiSubjectDataset(path).load_data(progress=False).training_set
    with pytest.raises(ConfigError):
        AbstractBatchSampler(subset, 'streamlines', batch_size=batch_size)
    with pytest.raises(ConfigError):
        AbstractBatchSampler(subset, 'streamlines', batch_size=10, split_ratio=ratio)
    with pytest.raises(ConfigError):
        AbstractBatchSampler(subset, 'streamlines', batch_size=10, reverse_ratio=ratio)
