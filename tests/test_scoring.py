"""Scoring a tractogram against a subject's reference bundles: hand-made cases, the dipy demo, the script."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dwiml_nb.core import PackedStreamlines
from dwiml_nb.data import make_demo_dataset
from dwiml_nb.scoring import (MDF_THRESHOLD_MM, assign_to_bundles, score_subject, score_tractogram,
                              score_tractogram_main, streamline_voxels, voxel_scores)

SCRIPT = [sys.executable, '-c', 'from dwiml_nb.scoring import score_tractogram_main; score_tractogram_main()']


@pytest.fixture(scope='module')
def dipy_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('scoring') / 'demo'
    return make_demo_dataset(out, which='dipy', progress=False)


def run_here(*args):
    with pytest.raises(SystemExit) as exit_info:
        score_tractogram_main([*map(str, args)])
    return exit_info.value.code


def _row(x0, x1, y=0.5, z=0.5):
    return [[x0 + 0.5, y, z], [x1 + 0.5, y, z]]


def test_voxel_scores_by_hand():
    shape = (30, 4, 4)
    reference = PackedStreamlines.from_sequence([_row(0, 9)])                           # voxels 0..9
    for tracked, (dice, overlap, overreach) in (
            ([_row(5, 14)], (0.5, 0.5, 0.5)),                                            # 5 shared, 5 outside
            ([_row(0, 9)], (1., 1., 0.)),
            ([_row(0, 4)], (2 * 5 / 15, 0.5, 0.)),
            ([_row(0, 19)], (2 * 10 / 30, 1., 1.)),
            ([_row(20, 29)], (0., 0., 1.))):
        scores = voxel_scores(streamline_voxels(PackedStreamlines.from_sequence(tracked), shape),
                              streamline_voxels(reference, shape))
        np.testing.assert_allclose([scores['dice'], scores['overlap'], scores['overreach']],
                                   [dice, overlap, overreach], err_msg=str(tracked))


def test_long_steps_leave_no_hole_and_points_outside_are_ignored():
    mask = streamline_voxels(PackedStreamlines.from_sequence([[[0.2, 0.5, 0.5], [7.9, 3.5, 0.5]],
                                                              [[-5, 0, 0], [-1, 0, 0]]]), (8, 4, 1))
    xs, ys = np.nonzero(mask[:, :, 0])
    assert xs.min() == 0 and xs.max() == 7 and len(set(xs)) == 8 and mask.sum() >= 8   # a connected path


def test_assignment_by_mdf_with_threshold():
    def line(y, n=10): return np.stack([np.arange(n, dtype=float), np.full(n, float(y)), np.zeros(n)], 1)
    references = [line(0), line(2), line(40)]
    ids, distance = assign_to_bundles([line(1), line(40.5)[::-1], line(20)], references, [3, 3, 9])
    assert ids.tolist() == [3, 9, -1]
    np.testing.assert_allclose(distance[:2], [1., 0.5])
    ids, _ = assign_to_bundles([line(20)], references, [3, 3, 9], threshold_mm=25)
    assert ids.tolist() == [3]
    ids, distance = assign_to_bundles([], references, [3, 3, 9])
    assert len(ids) == len(distance) == 0


def test_score_tractogram_by_hand():
    affine = np.diag([2., 2., 2., 1.])
    a = [_row(0, 9, y=2.5), _row(0, 9, y=3.5)]                 # bundle 0: 20 voxels
    b = [_row(0, 9, y=20.5)]                                  # bundle 1: 10 voxels
    reference = PackedStreamlines.from_sequence(a + b)
    tracked = PackedStreamlines.from_sequence([_row(0, 9, y=2.5), _row(0, 14, y=20.5), _row(0, 9, y=35.5)])
    scores = score_tractogram(tracked, reference, [0, 0, 1], affine=affine, shape=(20, 40, 2), bundle_names=['A', 'B'])
    assert scores['nb_streamlines'] == 3 and scores['nb_reference_streamlines'] == 3
    assert scores['nb_valid'] == 2 and np.isclose(scores['valid_ratio'], 2 / 3)      # the far one: no bundle
    # voxels: tracked 10 + 15 + 10 = 35, reference 30, shared 20
    np.testing.assert_allclose([scores['dice'], scores['overlap'], scores['overreach']], [40 / 65, 20 / 30, 15 / 30])
    A, B = scores['bundles']['A'], scores['bundles']['B']
    assert (A['nb_streamlines'], A['nb_reference_streamlines'], B['nb_streamlines']) == (1, 2, 1)
    np.testing.assert_allclose([A['dice'], A['overlap'], A['overreach']], [20 / 30, 0.5, 0.])
    np.testing.assert_allclose([B['dice'], B['overlap'], B['overreach']], [20 / 25, 1., 0.5])
    assert A['mean_closest_distance_mm'] == 0
    np.testing.assert_allclose(scores['length_mm']['min'], 18.)
    np.testing.assert_allclose(scores['length_mm']['max'], 28.)
    assert scores['mdf_threshold_mm'] == MDF_THRESHOLD_MM
    json.dumps(scores)                                         # JSON-able as it is


@pytest.mark.slow
def test_the_reference_scores_perfectly_against_itself(dipy_demo):
    hdf5 = dipy_demo.hdf5_files['dipy']
    from dwiml_nb.dataset import MultiSubjectDataset
    dataset = MultiSubjectDataset(hdf5).load_data(progress=False)
    subset = dataset.validation_set
    reference = subset.get_streamlines(0, 'streamlines', np.arange(subset.nb_streamlines(0, 'streamlines')))
    scores = score_subject(reference, dataset, 'sub_4')
    assert sorted(scores['bundles']) == ['AF_L', 'CC_ForcepsMajor', 'CST_R']
    assert (scores['dice'], scores['overlap'], scores['overreach'], scores['valid_ratio']) == (1., 1., 0., 1.)
    assert all(b['dice'] == 1 and b['nb_streamlines'] == b['nb_reference_streamlines'] for b in scores['bundles'].values())
    assert scores['mean_closest_distance_mm'] == 0
    np.testing.assert_allclose(scores['length_mm']['mean'], scores['reference_length_mm']['mean'])


@pytest.mark.slow
def test_script_table_json_and_formats(dipy_demo, tmp_path, capsys):
    hdf5 = dipy_demo.hdf5_files['dipy']
    trk = dipy_demo.database_dirs['dipy'] / 'sub_4' / 'tractograms' / 'CST_R.trk'
    proc = subprocess.run([*SCRIPT, str(trk), str(hdf5), 'sub_4', '--json', str(tmp_path / 's.json')],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'CST_R' in proc.stdout and 'valid_ratio 1.000' in proc.stdout
    scores = json.loads((tmp_path / 's.json').read_text())
    assert scores['bundles']['CST_R']['dice'] == 1 and scores['bundles']['AF_L']['nb_streamlines'] == 0
    # the same streamlines as .tck (RAS mm, no grid in the file) score the same
    tractogram = nib.streamlines.load(trk)
    nib.streamlines.save(nib.streamlines.Tractogram(tractogram.streamlines, affine_to_rasmm=np.eye(4)), tmp_path / 'c.tck')
    assert run_here(tmp_path / 'c.tck', hdf5, 'sub_4', '--json', tmp_path / 't.json') == 0
    tck = json.loads((tmp_path / 't.json').read_text())
    np.testing.assert_allclose(tck['bundles']['CST_R']['dice'], 1.)
    np.testing.assert_allclose(tck['mean_closest_distance_mm'], 0, atol=1e-3)
    names = tmp_path / 'names.json'
    names.write_text(json.dumps(['a', 'b', 'c', 'd']))
    assert run_here(trk, hdf5, 'sub_4', '--bundle_names', names, '--json', tmp_path / 'n.json') == 0
    assert sorted(json.loads((tmp_path / 'n.json').read_text())['bundles']) == ['a', 'b', 'c']
    capsys.readouterr()
    other_grid = dipy_demo.database_dirs['dipy'] / 'sub_1' / 'tractograms' / 'CST_R.trk'
    for args, message in (([other_grid, hdf5, 'sub_4'], "is not the subject's"),
                          ([trk, hdf5, 'sub_4', '--json', tmp_path / 's.json'], 'exists; pass --overwrite'),
                          ([trk, hdf5, 'nobody'], "no subject 'nobody'"),
                          ([trk, hdf5, 'sub_4', '--reference_group', 'input'], "'input' is a volume group"),
                          ([tmp_path / 'names.json', hdf5, 'sub_4'], 'expected .trk, .tck or .trx'),
                          ([trk, hdf5, 'sub_4', '--bundle_names', trk], 'is not valid JSON')):
        assert run_here(*args) == 2
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err


def test_a_reference_without_bundle_ids_is_one_bundle(dipy_demo, tmp_path, caplog):
    # An HDF5 whose streamlines carry no bundle_id: built from a copy of the database with a plain config.
    from dwiml_nb.hdf5 import create_hdf5_dataset
    db = tmp_path / 'db'
    shutil.copytree(dipy_demo.database_dirs['dipy'], db)
    config = json.loads((db / 'config.json').read_text())
    config['streamlines'].pop('dps_keys')
    (db / 'config.json').write_text(json.dumps(config))
    create_hdf5_dataset(db, tmp_path / 'plain.hdf5', db / 'config.json', ['sub_1'], ['sub_4'], ['sub_5'], progress=False)
    trk = db / 'sub_4' / 'tractograms' / 'AF_L.trk'
    scores = score_subject(trk, tmp_path / 'plain.hdf5', 'sub_4', bundle_names=['all'])
    assert list(scores['bundles']) == ['all'] and scores['valid_ratio'] == 1
    assert "no data per streamline 'bundle_id'" in caplog.text
