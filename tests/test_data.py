"""Process-level tests of the demo data: the console script, the files it writes, the HDF5 files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from dwiml_nb.core import PackedStreamlines
from dwiml_nb.data import (BUNDLE_NAMES_FILE, DEMO_CONFIG, DEMO_MARK, PHANTOM_BUNDLES, WM_MASK_DILATION_VOX,
                           demo_bundle_names, direction_alignment, hemisphere_directions, make_demo_main)

SCRIPT = [sys.executable, '-c', 'from dwiml_nb.data import make_demo_main; make_demo_main()']
SPLITS = ('training', 'validation', 'testing')


def run_script(*args):
    "The console script in a fresh process, as a user runs it."
    return subprocess.run([*SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_here(capsys):
    "The console script's entry point in this process (faster): returns (exit code, stderr)."
    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            make_demo_main([*map(str, args), '--quiet'])
        return exit_info.value.code, capsys.readouterr().err
    return run


def hdf5_content(path):
    "Every dataset and attribute of an HDF5 file by path, except the build time."
    content = {}
    with h5py.File(path, 'r') as f:
        def visit(name, obj):
            for k, v in obj.attrs.items():
                content[f'{name}@{k}'] = np.asarray(v)
            if isinstance(obj, h5py.Dataset):
                content[name] = obj[()]
        visit('/', f)
        f.visititems(visit)
    del content['/@data_and_time']
    return content


def database_files(db_dir):
    "Relative path -> bytes of every file of a database directory."
    return {str(p.relative_to(db_dir)): p.read_bytes() for p in sorted(Path(db_dir).rglob('*')) if p.is_file()}


def load_trk_vox(path, affine):
    "Streamlines of a .trk in voxel space, corner origin, through nibabel alone (independent of dwiml_nb)."
    streams = nib.streamlines.load(path).streamlines
    return [nib.affines.apply_affine(np.linalg.inv(affine), s) + 0.5 for s in streams]


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    "Both datasets, default options, built once by the console script in a fresh process."
    out = tmp_path_factory.mktemp('demo') / 'out'
    proc = run_script(out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_layout_config_and_splits(demo):
    assert (demo / DEMO_MARK).exists()
    for name, nb_subjects in (('phantom', 8), ('dipy', 6)):
        db = demo / name
        assert (demo / f'{name}.hdf5').is_file()
        assert json.loads((db / 'config.json').read_text()) == DEMO_CONFIG
        splits = {s: (db / f'{s}.txt').read_text().split() for s in SPLITS}
        subjects = sum(splits.values(), [])
        assert len(subjects) == len(set(subjects)) == nb_subjects
        assert all(splits.values())
        assert sorted(p.name for p in db.iterdir() if p.is_dir()) == sorted(subjects)
        names = json.loads((db / BUNDLE_NAMES_FILE).read_text())
        assert names == (list(PHANTOM_BUNDLES) if name == 'phantom' else ['AF_L', 'CC_ForcepsMajor', 'CST_R', 'fornix'])
        assert demo_bundle_names(demo / f'{name}.hdf5') == names
        for subj in subjects:
            img, mask = nib.load(db / subj / 'input.nii.gz'), nib.load(db / subj / 'tract_mask.nii.gz')
            assert img.ndim == 4 and img.get_data_dtype() == np.float32 and img.shape[-1] == 32
            np.testing.assert_array_equal(img.affine, mask.affine)
            data, inside = np.asarray(img.dataobj), np.asarray(mask.dataobj).astype(bool)
            assert inside.any() and not data[~inside].any()           # zero outside the tracts
            wm = nib.load(db / subj / 'wm_mask.nii.gz')
            np.testing.assert_array_equal(wm.affine, img.affine)
            wm = np.asarray(wm.dataobj).astype(bool)
            # the tracking mask: the tracts dilated, with room around them (not hugging the tracts)
            assert (wm >= inside).all() and wm.sum() > 1.5 * inside.sum()
            assert np.array_equal(wm, scipy.ndimage.binary_dilation(inside, iterations=WM_MASK_DILATION_VOX))
            trks = sorted((db / subj / 'tractograms').glob('*.trk'))
            assert trks
            for trk in trks:
                loaded = nib.streamlines.load(trk)
                header = loaded.header
                np.testing.assert_allclose(header['voxel_to_rasmm'], img.affine, atol=1e-5)
                assert tuple(header['dimensions']) == img.shape[:3]
                # every streamline carries its bundle's number, an index in bundle_names.json
                ids = np.unique(loaded.tractogram.data_per_streamline['bundle_id'])
                assert len(ids) == 1 and names[int(ids[0])] == trk.stem
    assert sorted(p.name for p in (demo / 'dipy' / 'sub_2' / 'tractograms').iterdir()) == \
        ['AF_L.trk', 'CC_ForcepsMajor.trk', 'CST_R.trk']
    assert [p.name for p in (demo / 'dipy' / 'fornix' / 'tractograms').iterdir()] == ['fornix.trk']


def test_phantom_geometry(demo):
    db = demo / 'phantom'
    img = nib.load(db / 'sub-01' / 'input.nii.gz')
    assert img.shape[:3] == (32, 32, 32)
    assert np.allclose(nib.affines.voxel_sizes(img.affine), 2.0) and np.abs(img.affine[:3, 3]).min() > 0
    for trk in (db / 'sub-01' / 'tractograms').glob('*.trk'):
        streams = nib.streamlines.load(trk).streamlines
        lengths = np.array([len(s) for s in streams])
        assert 20 <= lengths.min() and lengths.max() <= 80
        steps = np.concatenate([np.linalg.norm(np.diff(s, axis=0), axis=1) for s in streams])
        assert 0.5 <= np.median(steps) <= 1.0 + 0.2


def test_hdf5_has_every_subject_group_and_feature(demo):
    from dwiml_nb.hdf5 import open_dwiml_hdf5, read_root_attrs
    for name in ('phantom', 'dipy'):
        db = demo / name
        with open_dwiml_hdf5(demo / f'{name}.hdf5') as f:
            attrs = read_root_attrs(f)
            for split in SPLITS:
                assert attrs[f'{split}_subjs'] == (db / f'{split}.txt').read_text().split()
            assert attrs['groups_config'] == DEMO_CONFIG
            for subj in sum((attrs[f'{s}_subjs'] for s in SPLITS), []):
                assert f[subj]['input'].attrs['type'] == 'volume'
                assert f[subj]['input']['data'].shape == nib.load(db / subj / 'input.nii.gz').shape
                assert f[subj]['streamlines'].attrs['type'] == 'streamlines'
                assert f[subj]['wm_mask'].attrs['type'] == 'volume'
                np.testing.assert_array_equal(f[subj]['wm_mask']['data'][()][..., 0].astype(bool),
                                              np.asarray(nib.load(db / subj / 'wm_mask.nii.gz').dataobj).astype(bool))
                bundle_ids = f[subj]['streamlines']['data_per_streamline']['bundle_id'][()]
                assert bundle_ids.shape == (len(f[subj]['streamlines']['lengths']), 1)
                nb_streamlines = sum(int(nib.streamlines.load(t, lazy_load=True).header['nb_streamlines'])
                                     for t in (db / subj / 'tractograms').glob('*.trk'))
                assert len(f[subj]['streamlines']['lengths']) == nb_streamlines


def test_multisubject_dataset_reads_the_demo(demo):
    dataset_module = pytest.importorskip('dwiml_nb.dataset')
    ds = dataset_module.MultiSubjectDataset(demo / 'phantom.hdf5').load_data()
    assert ds.volume_groups == ['input', 'wm_mask'] and ds.streamline_groups == ['streamlines']
    assert ds.nb_features['wm_mask'] == 1
    assert ds.nb_features['input'] == 32
    assert [len(ds.training_set), len(ds.validation_set), len(ds.testing_set)] == [5, 2, 1]


@pytest.mark.parametrize('name, min_alignment', [('phantom', 0.85), ('dipy', 0.85)])
def test_features_encode_the_fiber_direction(demo, name, min_alignment):
    db = demo / name
    rng = np.random.default_rng(0)
    for subj in sorted(p.name for p in db.iterdir() if p.is_dir()):
        img = nib.load(db / subj / 'input.nii.gz')
        streams = PackedStreamlines.from_sequence(
            sum((load_trk_vox(t, img.affine) for t in sorted((db / subj / 'tractograms').glob('*.trk'))), []))
        features = np.asarray(img.dataobj)
        aligned = direction_alignment(features, streams)
        # Baseline: the same statistic with the feature directions scrambled.
        scrambled = direction_alignment(features, streams, hemisphere_directions(32)[rng.permutation(32)])
        assert aligned > min_alignment, (subj, aligned)
        assert scrambled < 0.7, (subj, scrambled)


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_data(demo, tmp_path, run_here):
    # built again in this process, the fixture's build ran in another one
    code, err = run_here(tmp_path / 'again')
    assert code == 0, err
    for name in ('phantom', 'dipy'):
        assert database_files(demo / name) == database_files(tmp_path / 'again' / name)
        # The README's claim: the HDF5 files hold the same content; only the build time (root
        # attribute data_and_time) and HDF5's own object timestamps differ between builds.
        a, b = hdf5_content(demo / f'{name}.hdf5'), hdf5_content(tmp_path / 'again' / f'{name}.hdf5')
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    code, err = run_here(tmp_path / 'other', '--which', 'phantom', '--seed', '5', '--nb_subjects', '3')
    assert code == 0, err
    for f in ('sub-01/input.nii.gz', 'sub-01/tractograms/helix.trk'):
        assert (tmp_path / 'other' / 'phantom' / f).read_bytes() != (demo / 'phantom' / f).read_bytes()


@pytest.mark.slow
def test_overwrite_semantics(tmp_path, run_here):
    out = tmp_path / 'out'
    assert run_here(out, '--which', 'phantom', '--nb_subjects', '3')[0] == 0
    before = database_files(out / 'phantom')

    code, err = run_here(out, '--which', 'phantom', '--nb_subjects', '3', '--seed', '9')
    assert code == 2 and '--overwrite' in err and 'Traceback' not in err
    assert database_files(out / 'phantom') == before                     # untouched

    # adding the other dataset to our own folder needs no --overwrite
    assert run_here(out, '--which', 'dipy')[0] == 0
    dipy_before = database_files(out / 'dipy')

    code, err = run_here(out, '--which', 'phantom', '--nb_subjects', '4', '--seed', '9', '--overwrite')
    assert code == 0, err
    assert sorted(p.name for p in (out / 'phantom').iterdir() if p.is_dir()) == ['sub-01', 'sub-02', 'sub-03', 'sub-04']
    assert database_files(out / 'phantom') != before
    assert database_files(out / 'dipy') == dipy_before                   # only the requested dataset rebuilt
    with h5py.File(out / 'phantom.hdf5', 'r') as f:
        assert sorted(f.keys()) == ['sub-01', 'sub-02', 'sub-03', 'sub-04']
    assert not [p for p in out.iterdir() if p.name.startswith('.')]       # no leftover temporary folder


def test_refuses_a_folder_that_is_not_ours(tmp_path, run_here):
    theirs = tmp_path / 'theirs'
    theirs.mkdir()
    (theirs / 'thesis.tex').write_text('precious')
    code, err = run_here(theirs, '--which', 'phantom', '--nb_subjects', '3')
    assert code == 2 and str(theirs) in err and 'not made by dwiml_make_demo_dataset' in err
    assert [p.name for p in theirs.iterdir()] == ['thesis.tex']
    # with --overwrite only our own outputs are written; the user's file stays
    code, err = run_here(theirs, '--which', 'phantom', '--nb_subjects', '3', '--overwrite')
    assert code == 0, err
    assert (theirs / 'thesis.tex').read_text() == 'precious'
    assert sorted(p.name for p in theirs.iterdir()) == [DEMO_MARK, 'phantom', 'phantom.hdf5', 'thesis.tex']


@pytest.mark.parametrize('args, message', [
    (['--nb_subjects', '2'], 'argument --nb_subjects: must be >= 3'),
    (['--nb_subjects', '100000'], 'must be >= 3 and <= 1000'),
    (['--seed', '-1'], 'argument --seed: must be >= 0'),
    (['--which', 'nope'], 'invalid choice'),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, run_here, args, message):
    code, err = run_here(tmp_path / 'out', *args)
    assert code == 2 and message in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


def test_out_dir_is_a_file(tmp_path):
    (tmp_path / 'file').write_text('x')
    proc = run_script(tmp_path / 'file')
    assert proc.returncode == 2 and 'not a directory' in proc.stderr and 'Traceback' not in proc.stderr


def test_an_output_folder_that_cannot_be_made_is_said_before_any_work(tmp_path, run_here):
    (tmp_path / 'a_file').write_text('x')
    cases = [('', 'the output folder needs a name'),
             (tmp_path / 'a_file' / 'demo', f"cannot be created: '{tmp_path / 'a_file'}' is not a directory"),
             ('/dev/null', 'exists and is not a directory'),
             (tmp_path / ('x' * 300), 'File name too long')]
    if os.geteuid() != 0:
        (tmp_path / 'ro').mkdir()
        (tmp_path / 'ro').chmod(0o555)
        cases.append((tmp_path / 'ro' / 'demo', 'is read-only'))
    try:
        for out, message in cases:
            code, err = run_here(out, '--which', 'phantom', '--nb_subjects', '3')
            assert code == 2 and message in err and 'Traceback' not in err, err
            assert len(err.strip().splitlines()) == 1, err
    finally:
        if (tmp_path / 'ro').exists(): (tmp_path / 'ro').chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file'] + (['ro'] if os.geteuid() != 0 else [])
