"""Reliability against bad data: every case is a real NIfTI / .trk file on disk, built with
`create_hdf5_dataset` (and a few through the console script). Each gives a clear `DataError` naming
subject, group and file, or a documented, logged handling; never a silent change of data."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from nibabel.streamlines import Field, Tractogram, TrkFile
from nibabel.streamlines.array_sequence import ArraySequence

from dwiml_nb.core import DataError
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.hdf5 import create_hdf5_dataset, open_dwiml_hdf5

from dwiml_nb.testing import write_dwiml_hdf5  # noqa: E402
from dwiml_nb.testing import (make_affine, make_database, random_streamlines, write_nifti,  # noqa: E402
                             write_subject_lists, write_tractogram)

BIN = Path(sys.executable).parent
SPLIT = (['sub-01'], ['sub-02'], [])


@pytest.fixture
def db(tmp_path):
    return make_database(tmp_path / 'db', ('sub-01', 'sub-02'), nb_streamlines=(4, 3))


def build(db, tmp_path, config=None):
    out = tmp_path / 'out' / 'out.hdf5'
    create_hdf5_dataset(db['root'], out, db['config'] if config is None else config, *SPLIT, progress=False)
    return out


def refused(db, tmp_path, match, config=None):
    "The build raises a DataError matching `match` and leaves nothing behind."
    with pytest.raises(DataError, match=match) as e:
        build(db, tmp_path, config)
    out_dir = tmp_path / 'out'
    assert not out_dir.exists() or list(out_dir.iterdir()) == []
    return e.value


def write_trk_raw(path, streamlines_vox_corner, affine, dims, dps=None):
    """Write a .trk with nibabel directly, keeping 0-point streamlines (dipy's writer drops them).

    The file's header announces every streamline given, as any writer would."""
    mm = [(np.asarray(s, np.float64).reshape(-1, 3) - 0.5) @ affine[:3, :3].T + affine[:3, 3]
          for s in streamlines_vox_corner]
    seq = ArraySequence()
    lengths = np.array([len(m) for m in mm], np.intp)
    seq._data = np.concatenate(mm).astype(np.float32) if mm else np.zeros((0, 3), np.float32)
    seq._lengths = lengths
    seq._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.intp) if mm else np.zeros(0, np.intp)
    dps = {} if dps is None else {k: np.asarray(v, np.float32).reshape(len(mm), -1 if mm else 1) for k, v in dps.items()}
    header = {Field.VOXEL_TO_RASMM: affine, Field.DIMENSIONS: np.array(dims, np.int16),
              Field.VOXEL_SIZES: np.abs(np.diag(affine)[:3]).astype(np.float32),
              Field.VOXEL_ORDER: ''.join(nib.aff2axcodes(affine))}
    TrkFile(Tractogram(seq, data_per_streamline=dps, affine_to_rasmm=np.eye(4)), header=header).save(str(path))


def replace_bundle(db, subj, streamlines, name='bundle_b', raw=False):
    s = db['subjects'][subj]
    path = db['root'] / subj / f'tractograms/{name}.trk'
    weights = {'weight': np.zeros(len(streamlines))}
    if raw:
        write_trk_raw(path, streamlines, s['affine'], s['dims'], dps=weights)
    else:
        write_tractogram(path, streamlines, s['affine'], s['dims'], dps=weights)
    return path


def walks(db, subj, n=4, seed=2):
    return random_streamlines(np.random.default_rng(seed), n, db['subjects'][subj]['dims'])


# ---------------------------------------------------------------------------------------------
# Volumes

@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_volume(db, tmp_path, value):
    data = db['subjects']['sub-02']['volumes']['anat/t1.nii.gz'].copy()
    data[3, 4, 5] = value
    write_nifti(db['root'] / 'sub-02/anat/t1.nii.gz', data, db['subjects']['sub-02']['affine'])
    e = refused(db, tmp_path, r'contains 1 NaN/Inf value\(s\)')
    assert (e.subject, e.group, Path(e.file).name) == ('sub-02', 'input', 't1.nii.gz')


def test_volumes_of_one_subject_on_different_grids(db, tmp_path):
    s = db['subjects']['sub-01']
    write_nifti(db['root'] / 'sub-01/masks/wm.nii.gz', np.ones((8, 9, 8), np.uint8), s['affine'])
    e = refused(db, tmp_path, r'has grid \(8, 9, 8\)')
    assert e.subject == 'sub-01' and Path(e.file).name == 'wm.nii.gz'
    rotated = s['affine'] @ np.array([[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.]])
    write_nifti(db['root'] / 'sub-01/masks/wm.nii.gz', np.ones((8, 9, 7), np.uint8), rotated)
    refused(db, tmp_path, 'affine that differs')


def test_subjects_with_different_numbers_of_features(db, tmp_path):
    s = db['subjects']['sub-02']
    write_nifti(db['root'] / 'sub-02/dwi/dwi.nii.gz', np.ones((*s['dims'], 5), np.float32), s['affine'])
    e = refused(db, tmp_path, r"has 6 feature\(s\) but subject 'sub-01' has 4")   # dwi + t1: 5 + 1 vs 3 + 1
    assert (e.subject, e.group) == ('sub-02', 'input')


# ---------------------------------------------------------------------------------------------
# Streamlines

@pytest.mark.filterwarnings('ignore::RuntimeWarning')   # nibabel, writing and moving the bad points
@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_nan_or_inf_coordinates(db, tmp_path, value):
    sl = walks(db, 'sub-01')
    sl[2][1, 0] = value
    replace_bundle(db, 'sub-01', sl)
    e = refused(db, tmp_path, r'1 streamline\(s\) have NaN/Inf coordinates \(first: #2\)')
    assert (e.subject, e.group, Path(e.file).name) == ('sub-01', 'streamlines', 'bundle_b.trk')


@pytest.mark.filterwarnings('ignore::RuntimeWarning')   # nibabel, writing and moving the bad points
@pytest.mark.parametrize('point', [[1e30, 2, 2], [-1e30, 2, 2], [2, 2, 3e38], [8.01, 2, 2], [2, -0.01, 2]])
def test_huge_coordinates_and_points_outside_the_volume(db, tmp_path, point):
    sl = walks(db, 'sub-01')
    sl[3][-1] = point
    replace_bundle(db, 'sub-01', sl)
    # 3e38 voxels are beyond float32 once in mm: the file holds inf, refused as such
    refused(db, tmp_path, r'1 streamline\(s\) have (points outside the volume \(8, 9, 7\)|NaN/Inf coordinates).*first: #3')


def test_points_on_the_border_are_inside(db, tmp_path):
    # Tracking stops on the volume's border; float32 round-off in the file may put such a point a
    # hair outside, which the builder tolerates (BORDER_TOLERANCE_VOX) and stores unchanged.
    sl = walks(db, 'sub-01')
    sl[0][0], sl[0][-1] = [0, 0, 0], [8, 9, 7]   # corner origin: the volume spans [0, dims]
    replace_bundle(db, 'sub-01', sl)
    with open_dwiml_hdf5(build(db, tmp_path)) as f:
        data, lengths = f['sub-01/streamlines/data'][()], f['sub-01/streamlines/lengths'][()]
    np.testing.assert_allclose(data[0], [0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(data[lengths[0] - 1], [8, 9, 7], atol=1e-5)


def test_one_point_streamline(db, tmp_path):
    sl = walks(db, 'sub-02')
    sl[1] = sl[1][:1]
    replace_bundle(db, 'sub-02', sl)
    refused(db, tmp_path, r'1 streamline\(s\) have fewer than 2 points \(first: #1, 1 point')


@pytest.mark.parametrize('with_dps', [True, False])
def test_zero_point_streamline_is_not_silently_dropped(db, tmp_path, with_dps):
    # nibabel's reader skips 0-point streamlines: without a check the subject would silently lose
    # one (and with dps, every weight after it would shift to the wrong streamline).
    sl = walks(db, 'sub-01')
    sl[1] = sl[1][:0]
    if not with_dps:
        db['config']['streamlines']['dps_keys'] = []
    s = db['subjects']['sub-01']
    path = db['root'] / 'sub-01/tractograms/bundle_b.trk'
    write_trk_raw(path, sl, s['affine'], s['dims'], dps={'weight': np.arange(4.)} if with_dps else None)
    e = refused(db, tmp_path, 'header announces 4 streamlines but 3 could be read|cannot be read as a tractogram')
    assert Path(e.file).name == 'bundle_b.trk' and e.subject == 'sub-01'


def test_an_empty_tractogram_is_logged_and_the_others_kept(db, tmp_path, caplog):
    replace_bundle(db, 'sub-01', [], raw=True)
    with caplog.at_level(logging.WARNING, logger='dwiml_nb.hdf5'):
        out = build(db, tmp_path)
    assert any('sub-01' in r.getMessage() and 'bundle_b.trk holds no streamline' in r.getMessage()
               for r in caplog.records)
    kept = db['subjects']['sub-01']['streamlines']['tractograms/bundle_a.trk']
    with open_dwiml_hdf5(out) as f:
        np.testing.assert_array_equal(f['sub-01/streamlines/lengths'][()], [len(s) for s in kept])
        np.testing.assert_allclose(f['sub-01/streamlines/data'][()], np.concatenate(kept), atol=1e-4)


def test_a_subject_with_no_streamlines_is_an_error(db, tmp_path):
    replace_bundle(db, 'sub-02', [], name='bundle_a', raw=True)
    replace_bundle(db, 'sub-02', [], name='bundle_b', raw=True)
    e = refused(db, tmp_path, 'has no streamline in any of its tractograms')
    assert (e.subject, e.group) == ('sub-02', 'streamlines')


def test_tractogram_and_volume_affines_disagree(db, tmp_path):
    s = db['subjects']['sub-02']
    shifted = s['affine'].copy()
    shifted[:3, 3] += [0.5, 0, 0]
    write_tractogram(db['root'] / 'sub-02/tractograms/bundle_a.trk', walks(db, 'sub-02'), shifted, s['dims'],
                     dps={'weight': np.zeros(4)})
    e = refused(db, tmp_path, r'header disagrees with the reference volume dwi.nii.gz: affine differs by up to 0.5 mm')
    assert (e.subject, Path(e.file).name) == ('sub-02', 'bundle_a.trk')
    flipped = make_affine(flip_x=False, origin=s['affine'][:3, 3])   # sub-02 is LAS: this is RAS
    write_tractogram(db['root'] / 'sub-02/tractograms/bundle_a.trk', walks(db, 'sub-02'), flipped, s['dims'],
                     dps={'weight': np.zeros(4)})
    refused(db, tmp_path, 'header disagrees with the reference volume')


# ---------------------------------------------------------------------------------------------
# Through the console script: one line, exit 2, no output file

def test_script_reports_bad_data_in_one_line(db, tmp_path):
    sl = walks(db, 'sub-02')
    sl[0][0, 2] = np.nan
    replace_bundle(db, 'sub-02', sl)
    config = tmp_path / 'config.json'
    config.write_text(json.dumps(db['config']))
    out = tmp_path / 'out.hdf5'
    proc = subprocess.run([str(BIN / 'dwiml_create_hdf5_dataset'), str(db['root']), str(out), str(config),
                           *map(str, write_subject_lists(tmp_path / 'lists', *SPLIT)), '--no_progress'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: subject 'sub-02', group 'streamlines', file")
    assert 'NaN/Inf coordinates' in proc.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------
# What was accepted is read back exactly

def test_built_file_round_trips_exactly_through_the_dataset(db, tmp_path):
    out = build(db, tmp_path)
    ds = MultiSubjectDataset(out).load_data(progress=False)
    with open_dwiml_hdf5(out) as f:
        for i, subj in enumerate(ds.training_set.subjects):
            np.testing.assert_array_equal(ds.training_set.get_volume(i, 'input').numpy(), f[f'{subj}/input/data'][()])
            n = ds.training_set.nb_streamlines(i, 'streamlines')
            got = ds.training_set.get_streamlines(i, 'streamlines', np.arange(n))
            np.testing.assert_array_equal(got.data, f[f'{subj}/streamlines/data'][()].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# A file from elsewhere (not built by us) with NaN/Inf: refused when read, in RAM and lazy modes

@pytest.mark.parametrize('where', ['sub-01/input/data', 'sub-01/streamlines/data'])
@pytest.mark.parametrize('lazy', [False, True])
def test_nan_in_a_foreign_hdf5_is_refused_when_read(tmp_path, where, lazy):
    path = tmp_path / 'foreign.hdf5'
    write_dwiml_hdf5(path)
    with h5py.File(path, 'a') as f:
        values = f[where][()]
        values.flat[7] = np.nan
        f[where][...] = values
    what = 'volume values' if 'input' in where else 'streamline points'
    with pytest.raises(DataError, match=f'the {what} contain 1 NaN/Inf value') as e:
        subset = MultiSubjectDataset(path, lazy=lazy).load_data(progress=False).training_set
        i = subset.subjects.index('sub-01')
        subset.get_volume(i, 'input')
        subset.get_streamlines(i, 'streamlines', np.arange(subset.nb_streamlines(i, 'streamlines')))
    assert (e.value.subject, e.value.group) == ('sub-01', where.split('/')[1]) and 'foreign.hdf5' in str(e.value)
