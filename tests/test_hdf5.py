"""dwiml_nb.hdf5: the builder against real NIfTI/trk/tck/trx files, the reader against dwi_ml's files,
and every bad input named in the issue (through the function, and through the scripts for a few)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from dipy.io.streamline import load_tractogram
from dipy.tracking.streamlinespeed import length as dipy_length

from dwiml_nb.core import ConfigError, DataError
from dwiml_nb.hdf5 import (NOT_DEFINED, STD_EPSILON, build_volume_group, create_hdf5_dataset, describe_hdf5,
                           open_dwiml_hdf5, read_group_attrs, read_root_attrs, standardize)

from dwiml_nb.testing import write_dwiml_hdf5  # noqa: E402
from dwiml_nb.testing import (make_affine, make_database, random_streamlines, write_nifti,  # noqa: E402
                             write_subject_lists, write_tractogram)

BIN = Path(sys.executable).parent
SUBJECTS = ('sub-01', 'sub-02', 'sub-03')
SPLIT = (['sub-02', 'sub-01'], ['sub-03'], [])


@pytest.fixture(scope='module')
def trk_db(tmp_path_factory):
    return make_database(tmp_path_factory.mktemp('trk') / 'db', SUBJECTS)


@pytest.fixture(scope='module')
def built(trk_db, tmp_path_factory):
    out = tmp_path_factory.mktemp('built') / 'out.hdf5'
    create_hdf5_dataset(trk_db['root'], out, trk_db['config'], *SPLIT, progress=False)
    return out


def dipy_vox_corner(path, reference='same'):
    "The slow obvious reference: dipy loads the file, we move it to voxel space, corner origin."
    sft = load_tractogram(str(path), reference, bbox_valid_check=False)
    sft.to_vox()
    sft.to_corner()
    return sft


def reference_standardize(data, mask, independent):
    "numpy reference: statistics over the mask voxels, population std, floored; loops over features."
    out = np.empty(data.shape, np.float64)
    if independent:
        for k in range(data.shape[-1]):
            v = data[..., k][mask].astype(np.float64)
            out[..., k] = (data[..., k] - v.mean()) / max(v.std(ddof=0), STD_EPSILON)
        return out
    v = data[mask].astype(np.float64).ravel()
    return (data - v.mean()) / max(v.std(ddof=0), STD_EPSILON)


def as4d(a):
    a = np.asarray(a, np.float32)
    return a[..., None] if a.ndim == 3 else a


def leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# ---------------------------------------------------------------------------------------------
# Round trip

def test_round_trip_streamlines_match_dipy(trk_db, built):
    with open_dwiml_hdf5(built) as f:
        for subj in SUBJECTS:
            g = f[subj]['streamlines']
            data, offsets, lengths = g['data'][:], g['offsets'][:], g['lengths'][:]
            files = trk_db['config']['streamlines']['files']  # config order: bundle_b, then bundle_a
            expected = [s for rel in files for s in dipy_vox_corner(trk_db['root'] / subj / rel).streamlines]
            assert len(lengths) == len(expected)
            np.testing.assert_array_equal(lengths, [len(s) for s in expected])
            np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
            for o, n, want in zip(offsets, lengths, expected):
                np.testing.assert_allclose(data[o:o + n], want, atol=1e-5, rtol=0)
            # and the generated truth itself (float32 storage in trk: ~1e-6 voxel)
            truth = [s for rel in files for s in trk_db['subjects'][subj]['streamlines'][rel]]
            np.testing.assert_allclose(data, np.concatenate(truth), atol=1e-4)
            weights = np.concatenate([trk_db['subjects'][subj]['dps'][rel]['weight'] for rel in files])
            np.testing.assert_array_equal(g['data_per_streamline/weight'][:], weights)
            # euclidean lengths in mm, against dipy on the RAS+mm streamlines
            mm = [s for rel in files for s in load_tractogram(str(trk_db['root'] / subj / rel), 'same').streamlines]
            np.testing.assert_allclose(g['euclidean_lengths'][:], dipy_length(mm), rtol=1e-5)


def test_round_trip_volumes_and_standardization(trk_db, built):
    with open_dwiml_hdf5(built) as f:
        for subj in SUBJECTS:
            vols = trk_db['subjects'][subj]['volumes']
            mask = vols['masks/wm.nii.gz'] > 0
            expected = np.concatenate([reference_standardize(as4d(vols['dwi/dwi.nii.gz']), mask, False),
                                       reference_standardize(as4d(vols['anat/t1.nii.gz']), mask, False)], axis=-1)
            np.testing.assert_allclose(f[subj]['input/data'][:], expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(f[subj]['wm_mask/data'][:], as4d(vols['masks/wm.nii.gz']))
            nifti_affine = nib.load(trk_db['root'] / subj / 'dwi/dwi.nii.gz').affine  # float32 in the header
            np.testing.assert_array_equal(read_group_attrs(f[subj]['input'])['affine'], nifti_affine)


def test_written_attrs_and_dtypes_follow_dwiml_layout(trk_db, built):
    with h5py.File(built, 'r') as f:
        a = f.attrs
        for key in ('chosen_subjs', 'training_subjs', 'validation_subjs', 'testing_subjs'):
            assert a[key].dtype == object and a[key].ndim == 1, key
            assert h5py.check_string_dtype(a.get_id(key).dtype) is not None
        assert list(a['chosen_subjs']) == [*SPLIT[0], *SPLIT[1]]
        assert list(a['testing_subjs']) == []
        assert isinstance(a['groups_config'], str) and a['groups_config'] == str(trk_db['config'])
        for key in ('step_size', 'nb_points', 'compress'):
            assert a[key] == NOT_DEFINED
        assert isinstance(a['data_and_time'], str)
        v = f['sub-01/input']
        assert v.attrs['type'] == 'volume' and v.attrs['affine'].dtype == np.float64 and v.attrs['affine'].shape == (4, 4)
        assert v.attrs['voxres'].dtype == np.float32 and v.attrs['voxres'].shape == (3,)
        assert v.attrs['nb_features'].dtype == np.int64 and v.attrs['nb_features'] == 4
        assert v['data'].dtype == np.float32 and v['data'].compression is None
        assert v['data'].fletcher32 and v['data'].chunks[1:] == v['data'].shape[1:]  # checksummed whole slabs
        s = f['sub-02/streamlines']
        assert (s.attrs['type'], s.attrs['space'], s.attrs['origin']) == ('streamlines', 'Space.VOX', 'Origin.TRACKVIS')
        assert s.attrs['affine'].dtype == np.float64
        assert s.attrs['dimensions'].dtype == np.int16 and list(s.attrs['dimensions']) == [8, 9, 7]
        assert s.attrs['voxel_sizes'].dtype == np.float32
        assert s.attrs['voxel_order'] == 'LAS' and f['sub-01/streamlines'].attrs['voxel_order'] == 'RAS'
        assert s['data'].dtype == np.float64 and s['euclidean_lengths'].dtype == np.float64
        assert s['offsets'].dtype == np.int64 and s['lengths'].dtype == np.int64
        dps = s['data_per_streamline/weight']
        assert dps.dtype == np.float32 and dps.shape == (len(s['lengths']), 1)


def test_reader_round_trip_and_dwiml_files(built, tmp_path):
    with open_dwiml_hdf5(built) as f:
        root = read_root_attrs(f)
    assert root['training_subjs'] == SPLIT[0] and root['testing_subjs'] == []
    assert (root['step_size'], root['nb_points'], root['compress']) == (None, None, None)
    truth = write_dwiml_hdf5(tmp_path / 'dwiml.hdf5', step_size=0.5, nb_points=None)
    with open_dwiml_hdf5(tmp_path / 'dwiml.hdf5') as f:
        root = read_root_attrs(f)
        assert root['groups_config'] == truth['config'] and root['chosen_subjs'] == truth['chosen_subjs']
        assert root['step_size'] == 0.5 and root['nb_points'] is None
        attrs = read_group_attrs(f['sub-02/streamlines'])
        np.testing.assert_array_equal(attrs['dimensions'], truth['subjects']['sub-02']['streamlines']['attrs']['dimensions'])
    # groups_config written as JSON (not dwi_ml's repr) is accepted too
    with h5py.File(tmp_path / 'dwiml.hdf5', 'a') as f:
        f.attrs['groups_config'] = json.dumps(truth['config'])
    with open_dwiml_hdf5(tmp_path / 'dwiml.hdf5') as f:
        assert read_root_attrs(f)['groups_config'] == truth['config']


def test_describe_agrees_with_file(trk_db, built):
    desc = describe_hdf5(built)
    assert desc['format_version'] == 1
    assert desc['subsets'] == {'training': SPLIT[0], 'validation': SPLIT[1], 'testing': []}
    assert desc['volume_groups'] == ['input', 'wm_mask'] and desc['streamline_groups'] == ['streamlines']
    assert desc['file_size_bytes'] == built.stat().st_size
    total = 0
    for subj in SUBJECTS:
        sl = trk_db['subjects'][subj]['streamlines']
        g = desc['subjects'][subj]['groups']
        assert g['input']['shape'] == [8, 9, 7, 4] and g['wm_mask']['nb_features'] == 1
        assert g['streamlines']['nb_streamlines'] == sum(len(v) for v in sl.values())
        assert g['streamlines']['nb_points'] == sum(len(s) for v in sl.values() for s in v)
        assert g['streamlines']['dps_keys'] == ['weight']
        total += g['streamlines']['nb_streamlines']
    assert desc['totals']['streamlines']['nb_streamlines'] == total
    assert json.loads(json.dumps(desc)) == desc


@pytest.mark.parametrize('fmt', ['tck', 'trx'])
def test_tck_and_trx_use_the_first_volume_as_reference(tmp_path, fmt):
    db = make_database(tmp_path / 'db', ('sub-01', 'sub-02'), tractogram_format=fmt)
    config = db['config']
    if fmt == 'tck':
        config['streamlines']['dps_keys'] = []  # .tck has no data_per_streamline
    out = create_hdf5_dataset(db['root'], tmp_path / 'out.hdf5', config, ['sub-01'], ['sub-02'], [], progress=False)
    with open_dwiml_hdf5(out) as f:
        for subj in ('sub-01', 'sub-02'):
            ref = db['root'] / subj / 'dwi/dwi.nii.gz'
            expected = [s for rel in config['streamlines']['files']
                        for s in dipy_vox_corner(db['root'] / subj / rel, str(ref)).streamlines]
            np.testing.assert_allclose(f[subj]['streamlines/data'][:], np.concatenate(expected), atol=1e-5)
            assert read_group_attrs(f[subj]['streamlines'])['voxel_order'] == ('LAS' if subj == 'sub-02' else 'RAS')


# ---------------------------------------------------------------------------------------------
# Resampling

def _lengths_mm(db, subj):
    files = db['config']['streamlines']['files']
    return np.asarray(dipy_length([s for rel in files
                                   for s in load_tractogram(str(db['root'] / subj / rel), 'same').streamlines]))


def test_step_size_resampling(trk_db, tmp_path):
    out = create_hdf5_dataset(trk_db['root'], tmp_path / 'o.hdf5', trk_db['config'], *SPLIT, step_size=0.7,
                              progress=False)
    with h5py.File(out, 'r') as f:
        assert f.attrs['step_size'] == 0.7 and f.attrs['nb_points'] == NOT_DEFINED
        g = f['sub-01/streamlines']
        assert g['data'].dtype == np.float32 and g['euclidean_lengths'].dtype == np.float32
        original = _lengths_mm(trk_db, 'sub-01')
        np.testing.assert_array_equal(g['lengths'][:], np.maximum(np.ceil(original / 0.7), 2))
        data, offsets, lengths = g['data'][:].astype(np.float64), g['offsets'][:], g['lengths'][:]
        affine = g.attrs['affine']
        for o, n, total, arc in zip(offsets, lengths, g['euclidean_lengths'][:], original):
            steps = np.linalg.norm(np.diff(data[o:o + n], axis=0) @ affine[:3, :3].T, axis=1)
            np.testing.assert_allclose(steps.sum(), total, rtol=1e-4)
            # points equally spaced along the original curve: every chord at most L / (n - 1)
            assert steps.max() <= arc / (n - 1) * (1 + 1e-4)
    with open_dwiml_hdf5(out) as f:
        assert read_root_attrs(f)['step_size'] == 0.7


def test_nb_points_and_compress(trk_db, tmp_path):
    out = create_hdf5_dataset(trk_db['root'], tmp_path / 'n.hdf5', trk_db['config'], *SPLIT, nb_points=5,
                              progress=False)
    with h5py.File(out, 'r') as f:
        assert f.attrs['nb_points'] == 5 and set(f['sub-03/streamlines/lengths'][:]) == {5}
    out = create_hdf5_dataset(trk_db['root'], tmp_path / 'c.hdf5', trk_db['config'], *SPLIT, compress=0.2,
                              progress=False)
    with h5py.File(out, 'r') as f, h5py.File(tmp_path / 'n.hdf5', 'r'):
        assert f.attrs['compress'] == 0.2
        g = f['sub-01/streamlines']
        original = [s for rel in trk_db['config']['streamlines']['files']
                    for s in dipy_vox_corner(trk_db['root'] / 'sub-01' / rel).streamlines]
        assert g['data'].shape[0] < sum(len(s) for s in original)
        data, offsets, lengths = g['data'][:], g['offsets'][:], g['lengths'][:]
        for o, n, s in zip(offsets, lengths, original):  # compression keeps both end points
            np.testing.assert_allclose(data[o], s[0], atol=1e-4)
            np.testing.assert_allclose(data[o + n - 1], s[-1], atol=1e-4)


@pytest.mark.parametrize('option', [{'step_size': 0.7}, {'nb_points': 6}, {'compress': 0.2}])
def test_builder_resampling_matches_dipy_one_streamline_at_a_time(trk_db, tmp_path, option):
    "The vectorized resampling (dwiml_nb.augment) against the slow reference: dipy per streamline, in RAS+ mm."
    from dipy.tracking.streamlinespeed import compress_streamlines, set_number_of_points
    out = create_hdf5_dataset(trk_db['root'], tmp_path / 'r.hdf5', trk_db['config'], *SPLIT, progress=False, **option)
    with h5py.File(out, 'r') as f:
        for subj in SUBJECTS:
            g = f[subj]['streamlines']
            expected = []
            for rel in trk_db['config']['streamlines']['files']:
                sft = load_tractogram(str(trk_db['root'] / subj / rel), 'same', bbox_valid_check=False)
                mm = [np.asarray(s, np.float64) for s in sft.streamlines]  # RAS+ mm
                if 'nb_points' in option:
                    mm = [set_number_of_points(s, option['nb_points']) for s in mm]
                elif 'step_size' in option:
                    counts = np.maximum(np.ceil(np.asarray(dipy_length(mm)) / option['step_size']), 2).astype(int)
                    mm = [set_number_of_points(s, int(n)) for s, n in zip(mm, counts)]
                else:
                    mm = compress_streamlines(mm, tol_error=option['compress'])
                affine = sft.affine  # voxel (centre) -> mm; + 0.5 for the corner origin
                inverse = np.linalg.inv(affine)
                expected += [s @ inverse[:3, :3].T + inverse[:3, 3] + 0.5 for s in mm]
            np.testing.assert_array_equal(g['lengths'][:], [len(s) for s in expected])
            # float32 precision: coordinates below ~100 voxels, float32 eps ~ 1e-7 relative
            np.testing.assert_allclose(g['data'][:], np.concatenate(expected), rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Standardization, against the numpy reference

@pytest.mark.parametrize('mode', ['all', 'independent', 'per_file', 'none'])
@pytest.mark.parametrize('with_mask', [True, False])
def test_standardization_modes(trk_db, mode, with_mask):
    subj = 'sub-01'
    conf = {'type': 'volume', 'files': ['dwi/dwi.nii.gz', 'anat/t1.nii.gz'], 'standardization': mode}
    if with_mask:
        conf['std_mask'] = 'masks/wm.nii.gz'
    data, affine, voxres = build_volume_group(trk_db['root'] / subj, 'input', conf, subject=subj)
    vols = trk_db['subjects'][subj]['volumes']
    dwi, t1 = as4d(vols['dwi/dwi.nii.gz']), as4d(vols['anat/t1.nii.gz'])
    both = np.concatenate([dwi, t1], axis=-1)
    mask_of = (lambda d: vols['masks/wm.nii.gz'] > 0) if with_mask else (lambda d: np.all(d != 0, axis=-1))
    if mode == 'none':
        expected = both
    elif mode == 'per_file':
        expected = np.concatenate([reference_standardize(d, mask_of(d), False) for d in (dwi, t1)], axis=-1)
    else:
        expected = reference_standardize(both, mask_of(both), mode == 'independent')
    assert data.dtype == np.float32
    np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(voxres, np.float32([1, 1.25, 2]))
    if mode != 'none' and not with_mask:
        assert np.count_nonzero(t1[..., 0] == 0) > 0  # the no-mask rule really excluded voxels


@pytest.mark.parametrize('independent', [False, True])
@pytest.mark.parametrize('slab_bytes', [16 << 20, 2000])
def test_standardize_in_place_matches_float64_reference(independent, slab_bytes, monkeypatch):
    import dwiml_nb.hdf5 as hdf5
    monkeypatch.setattr(hdf5, '_SLAB_BYTES', slab_bytes)  # 2000: one or two rows a slab, many slabs
    rng = np.random.default_rng(3)
    data = (rng.standard_normal((37, 9, 8, 3)) * [1, 50, 0.01] + [1000, -3, 0.5]).astype(np.float32)
    data[:5, :, :, 1] = 0  # excluded by the default mask
    mask = np.all(data != 0, axis=-1)
    expected = reference_standardize(data, mask, independent)
    np.testing.assert_allclose(standardize(data, independent=independent), expected, rtol=1e-6, atol=1e-6)
    same = standardize(data, independent=independent, out=data)
    assert same is data and data.dtype == np.float32
    np.testing.assert_allclose(data, expected, rtol=1e-6, atol=1e-6)


def test_standardize_floors_std_and_refuses_empty_mask():
    const = np.full((3, 3, 3, 2), 5, np.float32)
    np.testing.assert_array_equal(standardize(const, independent=True), 0)
    with pytest.raises(DataError, match='selects no voxel'):
        standardize(np.zeros((2, 2, 2, 1), np.float32))


# ---------------------------------------------------------------------------------------------
# Bad input through the function: one clear error naming where, and no output left behind

def _small_db(tmp_path, **kw):
    db = make_database(tmp_path / 'db', ('sub-01', 'sub-02'), nb_streamlines=(4, 3), **kw)
    return db, tmp_path / 'out' / 'out.hdf5'


def _expect(tmp_path, db, out, exc, match, config=None, split=(['sub-01'], ['sub-02'], []), **kw):
    with pytest.raises(exc, match=match) as e:
        create_hdf5_dataset(db['root'], out, db['config'] if config is None else config, *split, progress=False, **kw)
    assert not out.parent.exists() or leftovers(out.parent) == []
    return e.value


def test_missing_file(tmp_path):
    db, out = _small_db(tmp_path)
    (db['root'] / 'sub-02/anat/t1.nii.gz').unlink()
    e = _expect(tmp_path, db, out, DataError, r"missing: no file matches 'anat/t1.nii.gz'")
    assert (e.subject, e.group) == ('sub-02', 'input')


def test_subject_dir_missing(tmp_path):
    db, out = _small_db(tmp_path)
    e = _expect(tmp_path, db, out, DataError, 'has no directory', split=(['sub-01'], ['sub-09'], []))
    assert e.subject == 'sub-09'


@pytest.mark.parametrize('split, match', [((['sub-01', 'sub-01'], [], []), 'twice in training_subjs'),
                                          ((['sub-01'], ['sub-02'], ['sub-01']), 'in both training_subjs and testing_subjs'),
                                          (([], [], []), 'no subject')])
def test_subject_lists(tmp_path, split, match):
    db, out = _small_db(tmp_path)
    _expect(tmp_path, db, out, ConfigError, match, split=split)


def test_volumes_on_different_grids(tmp_path):
    db, out = _small_db(tmp_path)
    t1 = db['root'] / 'sub-02/anat/t1.nii.gz'
    write_nifti(t1, np.ones((8, 9, 6), np.float32), db['subjects']['sub-02']['affine'])
    e = _expect(tmp_path, db, out, DataError, r'has grid \(8, 9, 6\) but dwi.nii.gz has \(8, 9, 7\)')
    assert (e.subject, e.group, Path(e.file).name) == ('sub-02', 'input', 't1.nii.gz')
    # same shape, shifted affine, in another volume group
    db, out = _small_db(tmp_path / 'b')
    shifted = db['subjects']['sub-01']['affine'].copy()
    shifted[0, 3] += 2
    write_nifti(db['root'] / 'sub-01/masks/wm.nii.gz', np.ones((8, 9, 7), np.uint8), shifted)
    _expect(tmp_path, db, out, DataError, 'affine that differs')


def test_nan_in_volume(tmp_path):
    db, out = _small_db(tmp_path)
    data = db['subjects']['sub-01']['volumes']['dwi/dwi.nii.gz'].copy()
    data[2, 2, 2, 1], data[3, 3, 3, 0] = np.nan, np.inf
    write_nifti(db['root'] / 'sub-01/dwi/dwi.nii.gz', data, db['subjects']['sub-01']['affine'])
    e = _expect(tmp_path, db, out, DataError, r'contains 2 NaN/Inf')
    assert e.subject == 'sub-01' and Path(e.file).name == 'dwi.nii.gz'


def test_streamlines_outside_volume(tmp_path):
    db, out = _small_db(tmp_path)
    s = db['subjects']['sub-02']
    bad = random_streamlines(np.random.default_rng(1), 3, s['dims'])
    bad[1][-1] = [4, 4, 7.5]  # beyond z = 7
    write_tractogram(db['root'] / 'sub-02/tractograms/bundle_a.trk', bad, s['affine'], s['dims'],
                     dps={'weight': np.zeros(3)})
    e = _expect(tmp_path, db, out, DataError, r'1 streamline\(s\) have points outside the volume \(8, 9, 7\).*#1')
    assert (e.subject, e.group, Path(e.file).name) == ('sub-02', 'streamlines', 'bundle_a.trk')


def test_short_streamlines_are_an_error(tmp_path):
    db, out = _small_db(tmp_path)
    s = db['subjects']['sub-01']
    sl = random_streamlines(np.random.default_rng(2), 4, s['dims'])
    sl[2] = sl[2][:1]
    write_tractogram(db['root'] / 'sub-01/tractograms/bundle_b.trk', sl, s['affine'], s['dims'],
                     dps={'weight': np.zeros(4)})
    _expect(tmp_path, db, out, DataError, r'1 streamline\(s\) have fewer than 2 points \(first: #2, 1 point')


def test_trk_header_disagrees_with_reference(tmp_path):
    db, out = _small_db(tmp_path)
    s = db['subjects']['sub-01']
    sl = random_streamlines(np.random.default_rng(3), 4, (8, 9, 6))
    write_tractogram(db['root'] / 'sub-01/tractograms/bundle_a.trk', sl, s['affine'], (8, 9, 6),
                     dps={'weight': np.zeros(4)})
    e = _expect(tmp_path, db, out, DataError, r'header disagrees with the reference volume dwi.nii.gz: dimensions')
    assert Path(e.file).name == 'bundle_a.trk'
    db, out = _small_db(tmp_path / 'b')
    shifted = make_affine(origin=(0, 0, 0))
    write_tractogram(db['root'] / 'sub-01/tractograms/bundle_a.trk', sl, shifted, (8, 9, 7),
                     dps={'weight': np.zeros(4)})
    _expect(tmp_path, db, out, DataError, r'header disagrees with the reference volume dwi.nii.gz: affine')


@pytest.mark.parametrize('fmt', ['tck', 'trx'])
def test_tck_trx_without_volume_group(tmp_path, fmt):
    db, out = _small_db(tmp_path, tractogram_format=fmt)
    config = {'streamlines': {'type': 'streamlines', 'files': [f'tractograms/*.{fmt}']}}
    _expect(tmp_path, db, out, DataError, f'a .{fmt} tractogram needs a reference volume', config=config)


def test_trk_without_volume_group_is_fine(tmp_path):
    db, out = _small_db(tmp_path)
    config = {'streamlines': {'type': 'streamlines', 'files': ['tractograms/bundle_a.trk']}}
    create_hdf5_dataset(db['root'], out, config, ['sub-01'], ['sub-02'], [], progress=False)
    with open_dwiml_hdf5(out) as f:
        assert list(f['sub-01']) == ['streamlines'] and f['sub-01/streamlines/lengths'].shape == (4,)


def test_missing_dps_key(tmp_path):
    db, out = _small_db(tmp_path)
    db['config']['streamlines']['dps_keys'] = ['weight', 'score']
    _expect(tmp_path, db, out, DataError, r"has no data_per_streamline 'score' \(it has \['weight'\]\)")


@pytest.mark.parametrize('conf, match', [
    ({'type': 'volume', 'files': ['dwi/dwi.nii.gz'], 'standardization': 'all', 'std_masks': []}, r"unknown key\(s\) \['std_masks'\]"),
    ({'type': 'streamlines', 'files': ['t.trk'], 'connectivity_matrix': 'c.npy', 'connectivity_nb_blocs': 4}, 'not supported'),
    ({'type': 'surface', 'files': ['x.gii']}, "type 'surface' is not supported"),
    ({'type': 'volume', 'files': ['dwi/dwi.nii.gz']}, "'standardization' must be one of"),
    ({'files': ['dwi/dwi.nii.gz']}, "has no 'type'"),
])
def test_bad_config(tmp_path, conf, match):
    db, out = _small_db(tmp_path)
    config_file = tmp_path / 'config.json'
    config_file.write_text(json.dumps({'grp': conf}))
    e = _expect(tmp_path, db, out, ConfigError, match, config=config_file)
    assert e.group == 'grp' and Path(e.file) == config_file


def test_bad_resampling_options(tmp_path):
    db, out = _small_db(tmp_path)
    _expect(tmp_path, db, out, ConfigError, 'choose one of', step_size=1., nb_points=4)
    _expect(tmp_path, db, out, ConfigError, 'nb_points must be', nb_points=1)


def test_overwrite(tmp_path):
    db, out = _small_db(tmp_path)
    out.parent.mkdir()
    out.write_bytes(b'previous')
    _expect_kw = dict(split=(['sub-01'], ['sub-02'], []), progress=False)
    with pytest.raises(ConfigError, match='already exists'):
        create_hdf5_dataset(db['root'], out, db['config'], *_expect_kw['split'], progress=False)
    # a failing build with overwrite leaves the previous file intact
    (db['root'] / 'sub-02/dwi/dwi.nii.gz').write_bytes(b'not a nifti')
    with pytest.raises(DataError, match='cannot be read as NIfTI'):
        create_hdf5_dataset(db['root'], out, db['config'], *_expect_kw['split'], progress=False, overwrite=True)
    assert out.read_bytes() == b'previous' and leftovers(out.parent) == ['out.hdf5']
    create_hdf5_dataset(db['root'], out, db['config'], ['sub-01'], [], [], progress=False, overwrite=True)
    with open_dwiml_hdf5(out) as f:
        assert read_root_attrs(f)['chosen_subjs'] == ['sub-01']


# ---------------------------------------------------------------------------------------------
# open_dwiml_hdf5 on files that are not ours

def test_open_refuses_foreign_and_truncated_files(built, tmp_path):
    with pytest.raises(DataError, match='does not exist'):
        open_dwiml_hdf5(tmp_path / 'missing.hdf5')
    (tmp_path / 'text.hdf5').write_text('hello')
    with pytest.raises(DataError, match='not an HDF5 file'):
        open_dwiml_hdf5(tmp_path / 'text.hdf5')
    raw = built.read_bytes()
    for cut in (len(raw) // 3, len(raw) - 100):
        (tmp_path / 'cut.hdf5').write_bytes(raw[:cut])
        with pytest.raises(DataError, match='truncated or corrupted') as e:
            open_dwiml_hdf5(tmp_path / 'cut.hdf5')
        assert Path(e.value.file).name == 'cut.hdf5'
    with h5py.File(tmp_path / 'foreign.hdf5', 'w') as f:
        f['x'] = np.zeros(3)
    with pytest.raises(DataError, match=r"root attribute\(s\) \['groups_config'"):
        open_dwiml_hdf5(tmp_path / 'foreign.hdf5')
    write_dwiml_hdf5(tmp_path / 'notype.hdf5')
    with h5py.File(tmp_path / 'notype.hdf5', 'a') as f:
        del f['sub-02/input'].attrs['type']
    with pytest.raises(DataError, match="has type None") as e:
        open_dwiml_hdf5(tmp_path / 'notype.hdf5')
    assert (e.value.subject, e.value.group) == ('sub-02', 'input')
    write_dwiml_hdf5(tmp_path / 'nosubj.hdf5')
    with h5py.File(tmp_path / 'nosubj.hdf5', 'a') as f:
        del f['sub-04']
    with pytest.raises(DataError, match='listed in validation_subjs but has no group'):
        open_dwiml_hdf5(tmp_path / 'nosubj.hdf5')


# ---------------------------------------------------------------------------------------------
# The console scripts, in a subprocess

def run(script, *args):
    return subprocess.run([str(BIN / script), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_scripts_build_and_describe(trk_db, tmp_path):
    lists = write_subject_lists(tmp_path / 'lists', *SPLIT)
    config = tmp_path / 'config.json'
    config.write_text(json.dumps(trk_db['config']))
    out = tmp_path / 'out.hdf5'
    r = run('dwiml_create_hdf5_dataset', trk_db['root'], out, config, *lists, '--nb_points', 6, '--no_progress')
    assert r.returncode == 0, r.stderr
    r = run('dwiml_describe_hdf5', out, '--json')
    assert r.returncode == 0, r.stderr
    desc = json.loads(r.stdout)
    desc_fn = describe_hdf5(out)
    assert desc == json.loads(json.dumps(desc_fn))
    assert desc['nb_points'] == 6 and desc['step_size'] is None
    with h5py.File(out, 'r') as f:
        assert desc['totals']['streamlines']['nb_points'] == sum(f[s]['streamlines/data'].shape[0] for s in SUBJECTS)
    r = run('dwiml_describe_hdf5', out)
    assert r.returncode == 0 and 'training' in r.stdout and 'sub-03 (validation)' in r.stdout
    # refusing to overwrite
    r = run('dwiml_create_hdf5_dataset', trk_db['root'], out, config, *lists)
    assert r.returncode == 2 and 'already exists' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.slow
def test_scripts_bad_input_exit_2_without_traceback(trk_db, tmp_path):
    config = tmp_path / 'config.json'
    config.write_text(json.dumps({**trk_db['config'], 'conn': {'type': 'streamlines', 'files': ['x.trk'],
                                                                'connectivity_labels': 'l.nii.gz'}}))
    lists = write_subject_lists(tmp_path / 'lists', *SPLIT)
    out = tmp_path / 'out' / 'out.hdf5'
    r = run('dwiml_create_hdf5_dataset', trk_db['root'], out, config, *lists)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert "group 'conn'" in r.stderr and 'not supported' in r.stderr
    assert not out.exists() and (not out.parent.exists() or leftovers(out.parent) == [])
    lists = write_subject_lists(tmp_path / 'lists2', ['sub-01', 'sub-07'], [], [])
    config.write_text(json.dumps(trk_db['config']))
    r = run('dwiml_create_hdf5_dataset', trk_db['root'], out, config, *lists)
    assert r.returncode == 2 and "subject 'sub-07'" in r.stderr and 'Traceback' not in r.stderr
    (tmp_path / 'x.hdf5').write_bytes(b'\x89HDF\r\n\x1a\n' + b'\0' * 50)
    r = run('dwiml_describe_hdf5', tmp_path / 'x.hdf5', '--json')
    assert r.returncode == 2 and 'x.hdf5' in r.stderr and 'Traceback' not in r.stderr and r.stdout == ''
