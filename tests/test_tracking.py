"""Tracking with a trained experiment: analytic fields, stopping rules, reproducibility, file formats, the script."""
from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from dwiml_nb.core import CheckpointError, ConfigError
from dwiml_nb.data import make_demo_dataset, rasmm_to_vox
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.please_copy_and_adapt.train_model import build_parser, train_model
from dwiml_nb.tracking import (FieldModel, coordinate_volume, find_subject, lengths_mm, load_experiment_model,
                               model_inputs_fn, seeds_in_mask, subject_mask, track_from_model_main, track_streamlines,
                               track_subject)

SCRIPT = [sys.executable, '-c', 'from dwiml_nb.tracking import track_from_model_main; track_from_model_main()']


@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
    "A 3-subject phantom and a tiny model trained on it for a few batches: (hdf5 file, experiments path)."
    out = tmp_path_factory.mktemp('tracking')
    hdf5 = make_demo_dataset(out / 'demo', which='phantom', nb_subjects=3, progress=False).hdf5_files['phantom']
    train_model(build_parser().parse_args([
        str(out / 'exp'), 'tiny', str(hdf5), 'input', 'streamlines', '--max_epochs', '1', '--batch_size', '20',
        '--max_batches_per_epoch_training', '2', '--max_batches_per_epoch_validation', '1', '--hidden_size', '8',
        '--no_progress', '--device', 'cpu']))
    return hdf5, out / 'exp'


def run_here(*args):
    "The console script in this process: its exit code."
    with pytest.raises(SystemExit) as exit_info:
        track_from_model_main([*map(str, args), '--no_progress'])
    return exit_info.value.code


# --- the tracker, against analytic fields -------------------------------------------------------
SHAPE = (40, 40, 12)


def _along(direction):
    d = torch.tensor([direction], dtype=torch.float64)
    return FieldModel(lambda p, previous: d.expand(len(p), 3))


@pytest.mark.parametrize('direction', [(1., 0., 0.), (0., 1., 1.), (1., -2., 0.5)])
def test_straight_fields_are_followed_exactly_both_ways(direction):
    seed = np.array([[20.3, 19.7, 6.2]], np.float32)
    streams, stats = track_streamlines(_along(direction), model_inputs_fn(coordinate_volume(SHAPE)), seed,
                                       shape=SHAPE, step_size_mm=0.5, min_length=0, max_length=500)
    line = streams[0].astype(np.float64)
    unit = np.asarray(direction) / np.linalg.norm(direction)
    offsets = line - seed
    np.testing.assert_allclose(offsets - np.outer(offsets @ unit, unit), 0, atol=1e-4)     # on the line
    np.testing.assert_allclose(np.diff(offsets @ unit), 0.5, atol=1e-4)                    # one step apart, one way
    assert (offsets @ unit).min() < -1 and (offsets @ unit).max() > 1                       # both ways from the seed
    assert ((line >= 0) & (line < SHAPE)).all()
    assert stats == {'nb_seeds': 1, 'nb_streamlines': 1, 'nb_too_short': 0, 'nb_cut': 0}


def test_a_helix_is_followed_exactly():
    # Points p(t) = (20 + r cos t, 20 + r sin t, 6 + c t): the field gives the chord to p(t ± dt), one step long.
    r, c, step = 6.0, 0.8, 0.5
    dt = step / np.hypot(r, c)   # approximately; the exact chord length is recomputed below
    def chord(p, previous):
        t = torch.atan2(p[:, 1] - 20, p[:, 0] - 20)
        turns = torch.round(((p[:, 2] - 6) / c - t) / (2 * np.pi))
        t = t + 2 * np.pi * turns
        sign = torch.where((previous[:, 2] < 0), -1.0, 1.0).to(p.dtype)
        nxt = t + sign * dt
        target = torch.stack([20 + r * torch.cos(nxt), 20 + r * torch.sin(nxt), 6 + c * nxt], 1)
        return target - p
    chord_len = np.linalg.norm([r * np.cos(dt) - r, r * np.sin(dt), c * dt])
    seed = np.array([[20 + r, 20, 6.0]], np.float32)  # t = 0 of the helix whose z0 is 6
    streams, _ = track_streamlines(FieldModel(chord), model_inputs_fn(coordinate_volume(SHAPE)), seed, shape=SHAPE,
                                   step_size_mm=chord_len, theta=20, min_length=0, max_length=40)
    s = streams[0].astype(np.float64)
    forward = s[np.flatnonzero((s == seed[0]).all(1))[0]:]
    np.testing.assert_allclose(np.hypot(forward[:, 0] - 20, forward[:, 1] - 20), r, atol=1e-3)   # on the cylinder
    t = np.unwrap(np.arctan2(forward[:, 1] - 20, forward[:, 0] - 20))
    np.testing.assert_allclose(forward[:, 2] - 6, c * t, atol=1e-3)                         # and on the helix
    assert len(forward) > 20


def test_stopping_rules_mask_angle_and_lengths():
    shape, inputs = (40, 8, 8), model_inputs_fn(coordinate_volume((40, 8, 8)))
    mask = np.zeros(shape, bool)
    mask[5:35] = True
    seeds = [[20.5, 4.5, 4.5], [1.5, 4.5, 4.5], [6.5, 4.5, 4.5]]
    streams, stats = track_streamlines(_along((1., 0., 0.)), inputs, seeds, shape=shape, tracking_mask=mask,
                                       step_size_mm=1.0, min_length=2.0, max_length=100)
    # seed 1 is outside the mask (dropped), seeds 0 and 2 go from border to border of the mask
    assert stats == {'nb_seeds': 3, 'nb_streamlines': 2, 'nb_too_short': 1, 'nb_cut': 0}
    for s in streams:
        assert s[:, 0].min() >= 5 and s[:, 0].max() < 35 and s[:, 0].min() < 6 and s[:, 0].max() > 34
    streams, stats = track_streamlines(_along((1., 0., 0.)), inputs, seeds[:1], shape=shape, tracking_mask=mask,
                                       step_size_mm=1.0, min_length=0, max_length=10)
    assert len(streams[0]) == 11 and stats['nb_cut'] == 1 and np.isclose(lengths_mm(streams, (1, 1, 1))[0], 10)
    assert abs(streams[0][:, 0].mean() - 20.5) < 1e-5        # the window is centred on the seed
    streams, stats = track_streamlines(_along((1., 0., 0.)), inputs, seeds, shape=shape, tracking_mask=mask,
                                       step_size_mm=1.0, min_length=25, max_length=100)
    assert stats['nb_too_short'] == 1 and stats['nb_streamlines'] == 2   # 29 mm long: kept; the lone seed: not
    streams, _ = track_streamlines(_along((1., 0., 0.)), inputs, seeds, shape=shape, tracking_mask=mask,
                                   step_size_mm=1.0, min_length=30, max_length=100)
    assert len(streams) == 0


def test_sharp_turns_stop_at_theta():
    def zigzag(p, previous):   # turns by 60° at x = 20
        after = p[:, :1] >= 20
        a = torch.tensor([1., 0., 0.], dtype=p.dtype)
        b = torch.tensor([0.5, np.sqrt(3) / 2, 0.], dtype=p.dtype)
        return torch.where(after, b, a)
    inputs = model_inputs_fn(coordinate_volume(SHAPE))
    for theta, goes_on in ((50, False), (70, True)):
        streams, _ = track_streamlines(FieldModel(zigzag), inputs, [[10.5, 5.5, 5.5]], shape=SHAPE, theta=theta,
                                       min_length=0, max_length=40)
        assert (streams[0][:, 1].max() > 7) == goes_on


def test_seeds_are_reproducible_and_inside_their_voxels():
    mask = np.zeros((9, 9, 9), bool)
    mask[2:4, 5, 1:8] = True
    a = seeds_in_mask(mask, np.random.default_rng(3), nb_seeds=500)
    assert np.array_equal(a, seeds_in_mask(mask, np.random.default_rng(3), nb_seeds=500))
    assert not np.array_equal(a, seeds_in_mask(mask, np.random.default_rng(4), nb_seeds=500))
    assert mask[tuple(np.floor(a).astype(int).T)].all()
    per_voxel = seeds_in_mask(mask, np.random.default_rng(0), nb_seeds_per_voxel=2)
    assert len(per_voxel) == 2 * mask.sum()


# --- a trained experiment on real data -----------------------------------------------------------
@pytest.mark.slow
def test_track_subject_with_a_trained_model(experiment):
    hdf5, exp = experiment
    trained = load_experiment_model(exp, 'tiny', 'last')
    dataset = MultiSubjectDataset(hdf5).load_data(progress=False)
    subset, index = find_subject(dataset, 'sub-02')
    wm = subject_mask(subset, index, 'wm_mask')
    seeds = seeds_in_mask(wm, np.random.default_rng(0), nb_seeds=60)
    kwargs = dict(input_group='input', seeds=seeds, tracking_mask='wm_mask', step_size_mm=1.0, theta=60, min_length=6,
                  max_length=40, **trained.neighborhood)
    result = track_subject(trained.model, dataset, 'sub-02', **kwargs)
    s = result.stats
    assert s['nb_seeds'] == 60 and s['nb_streamlines'] + s['nb_too_short'] == 60
    lengths = lengths_mm(result.streamlines, (2., 2., 2.))
    assert (lengths >= 6 - 1e-4).all() and (lengths <= 40 + 1e-4).all()
    assert wm[tuple(np.floor(result.streamlines.data).astype(int).T)].all()
    again = track_subject(trained.model, dataset.validation_set, 'sub-02', **kwargs)
    assert np.array_equal(again.streamlines.data, result.streamlines.data)
    assert np.array_equal(again.streamlines.lengths, result.streamlines.lengths)


def test_load_experiment_model_refusals(experiment, tmp_path):
    _, exp = experiment
    with pytest.raises(ConfigError, match="'best' or 'last'"):
        load_experiment_model(exp, 'tiny', 'worst')
    with pytest.raises(CheckpointError, match='no such experiment folder'):
        load_experiment_model(exp, 'missing')
    best = exp / 'tiny' / 'best_model' / 'model_state.pt'
    saved = best.read_bytes()
    try:
        best.write_bytes(b'garbage')
        with pytest.raises(CheckpointError, match='cannot be read'):
            load_experiment_model(exp, 'tiny')
        best.unlink()
        with pytest.raises(CheckpointError, match='try --model last'):
            load_experiment_model(exp, 'tiny')
    finally:
        best.write_bytes(saved)


@pytest.mark.slow
def test_script_same_seed_same_file_and_formats(experiment, tmp_path):
    hdf5, exp = experiment
    common = [exp, 'tiny', hdf5, 'sub-02']
    options = ['--tracking_mask_group', 'wm_mask', '--nb_seeds', '40', '--min_length', '5', '--max_length', '60']
    proc = subprocess.run([*SCRIPT, *map(str, common), tmp_path / 'a.trk', *options, '--no_progress'],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'streamlines from 40 seeds' in proc.stdout
    assert run_here(*common, tmp_path / 'b.trk', *options) == 0
    assert (tmp_path / 'a.trk').read_bytes() == (tmp_path / 'b.trk').read_bytes()   # another process, same bytes
    assert run_here(*common, tmp_path / 'c.trk', *options, '--seed', '7') == 0
    assert (tmp_path / 'a.trk').read_bytes() != (tmp_path / 'c.trk').read_bytes()
    trk = nib.streamlines.load(tmp_path / 'a.trk')
    with h5py_subject(hdf5, 'sub-02') as (affine, shape):
        assert tuple(trk.header['dimensions']) == shape
        np.testing.assert_allclose(trk.header['voxel_to_rasmm'], affine, atol=1e-5)
        reference = np.concatenate(list(trk.streamlines))
        assert run_here(*common, tmp_path / 'a.tck', *options) == 0
        tck = np.concatenate(list(nib.streamlines.load(tmp_path / 'a.tck').streamlines))
        np.testing.assert_allclose(tck, reference, atol=1e-3)                      # same streamlines, RAS mm
        assert run_here(*common, tmp_path / 'a.trx', *options) == 0
        from dipy.io.streamline import load_tractogram
        trx = load_tractogram(str(tmp_path / 'a.trx'), str(tmp_path / 'a.trk'), bbox_valid_check=False)
        np.testing.assert_allclose(np.asarray(trx.streamlines.get_data()), reference, atol=1e-3)
        vox = rasmm_to_vox(reference, affine)
        wm = MultiSubjectDataset(hdf5).load_data(progress=False).validation_set.get_volume(0, 'wm_mask')[..., 0].numpy()
        assert wm[tuple(np.floor(vox).astype(int).T)].all()


class h5py_subject:
    "The grid (affine, shape) of a subject's input volume, read with h5py alone."
    def __init__(self, hdf5, subject): self.hdf5, self.subject = hdf5, subject

    def __enter__(self):
        import h5py
        with h5py.File(self.hdf5, 'r') as f:
            g = f[self.subject]['input']
            return np.asarray(g.attrs['affine']), tuple(g['data'].shape[:3])

    def __exit__(self, *exc): return False


def test_script_masks_from_nifti_and_refusals(experiment, tmp_path, capsys):
    hdf5, exp = experiment
    common = [exp, 'tiny', hdf5, 'sub-02']
    with h5py_subject(hdf5, 'sub-02') as (affine, shape):
        mask = np.zeros(shape, np.uint8)
        mask[10:20, 10:20, 10:20] = 1
        nib.save(nib.Nifti1Image(mask, affine), tmp_path / 'box.nii.gz')
        nib.save(nib.Nifti1Image(mask[:-1], affine), tmp_path / 'small.nii.gz')
    assert run_here(*common, tmp_path / 'box.trk', '--tracking_mask', tmp_path / 'box.nii.gz', '--nb_seeds', '10',
                    '--min_length', '0') == 0
    vox = rasmm_to_vox(np.concatenate(list(nib.streamlines.load(tmp_path / 'box.trk').streamlines)), affine)
    assert ((vox >= 10) & (vox < 20)).all()
    capsys.readouterr()
    for args, message in (
            ([tmp_path / 'x.trk', '--tracking_mask', tmp_path / 'small.nii.gz'], 'has shape (31, 32, 32)'),
            ([tmp_path / 'box.trk', '--tracking_mask_group', 'wm_mask'], 'exists; pass --overwrite'),
            ([tmp_path / 'x.vtk', '--tracking_mask_group', 'wm_mask'], 'must end with .trk or .tck or .trx'),
            ([tmp_path / 'x.trk'], 'give a seeding mask'),
            ([tmp_path / 'x.trk', '--tracking_mask_group', 'nope'], "unknown volume group 'nope'"),
            ([tmp_path / 'x.trk', '--tracking_mask_group', 'wm_mask', '--device', 'gpu0'], 'is not a device')):
        assert run_here(*common, *args) == 2
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert run_here(exp, 'tiny', hdf5, 'sub-99', tmp_path / 'x.trk', '--tracking_mask_group', 'wm_mask') == 2
    assert "no subject 'sub-99'" in capsys.readouterr().err
    assert not (tmp_path / 'x.trk').exists()
