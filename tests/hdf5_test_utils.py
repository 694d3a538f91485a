"""Write small but real test subjects: NIfTI volumes and .trk/.tck/.trx tractograms on disk.

Everything is generated (no download) and returned as ground truth, so tests can compare what
comes back from an HDF5 file with what was written:

    db = make_database(tmp_path / 'db')
    db['config']                                        # a dwi_ml groups config for this database
    db['subjects']['sub-01']['streamlines']['tractograms/bundle_b.trk']   # voxel/corner, float64
    lists = write_subject_lists(tmp_path, ['sub-01'], ['sub-02'], ['sub-03'])

Streamlines are given and returned in voxel space, corner origin (dwi_ml's Space.VOX,
Origin.TRACKVIS), the convention of dwiml_nb.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.io.stateful_tractogram import Origin, Space, StatefulTractogram
from dipy.io.streamline import save_tractogram


def make_affine(voxel_sizes=(1.0, 1.25, 2.0), origin=(-10.0, 5.0, 3.0), flip_x=False):
    "An axis-aligned voxel-to-RAS+mm affine (flip_x gives an LAS voxel order)."
    affine = np.diag([*map(float, voxel_sizes), 1.0])
    if flip_x:
        affine[0, 0] = -affine[0, 0]
    affine[:3, 3] = origin
    return affine


def write_nifti(path, data, affine):
    "Save `data` (kept in its dtype) with `affine` to `path` (.nii or .nii.gz); return the path."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def random_streamlines(rng, nb_streamlines, dims, min_points=2, max_points=20, margin=0.05):
    "Random walks strictly inside a volume of shape `dims` (voxel space, corner origin), float64."
    dims = np.asarray(dims, dtype=np.float64)
    out = []
    for n in rng.integers(min_points, max_points + 1, nb_streamlines):
        start = rng.uniform(0.3, 0.7, 3) * dims
        steps = rng.normal(scale=0.4, size=(n, 3))
        steps[0] = 0
        out.append(np.clip(start + np.cumsum(steps, axis=0), margin, dims - margin))
    return out


def reference_image(affine, dims):
    "A tiny NIfTI image standing for the grid (affine, dims), to serve as a dipy reference."
    return nib.Nifti1Image(np.zeros(tuple(dims), np.uint8), affine)


def write_tractogram(path, streamlines, affine, dims, dps=None):
    """Save streamlines given in voxel space / corner origin of the grid (affine, dims).

    The format follows the suffix (.trk, .tck, .trx). `dps` (dict key -> (N,) or (N, k) array)
    is stored where the format allows it (.trk, .trx). Points outside the grid are written as
    given, so that tests can build invalid files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dps = {} if dps is None or path.suffix == '.tck' else {k: np.asarray(v, np.float32).reshape(len(streamlines), -1)
                                                           for k, v in dps.items()}
    sft = StatefulTractogram([np.asarray(s, np.float32) for s in streamlines], reference_image(affine, dims),
                             Space.VOX, origin=Origin.TRACKVIS, data_per_streamline=dps)
    save_tractogram(sft, str(path), bbox_valid_check=False)
    return path


def default_config(tractogram_files=('tractograms/bundle_b.trk', 'tractograms/bundle_a.trk'), dps_keys=('weight',)):
    "The groups config matching `make_database` (volume groups first, then one streamline group)."
    return {
        'input': {'type': 'volume', 'files': ['dwi/dwi.nii.gz', 'anat/t1.nii.gz'],
                  'standardization': 'per_file', 'std_mask': ['masks/wm.nii.gz']},
        'wm_mask': {'type': 'volume', 'files': ['masks/wm.nii.gz'], 'standardization': 'none'},
        'streamlines': {'type': 'streamlines', 'files': list(tractogram_files), 'dps_keys': list(dps_keys)},
    }


def make_subject(subj_dir, rng, *, dims=(8, 9, 7), affine=None, nb_streamlines=(12, 7), tractogram_format='trk',
                 nb_dwi_features=3):
    """Write one subject: dwi (4-D), t1 (3-D), wm mask, and two tractograms bundle_a / bundle_b.

    Returns the ground truth: 'affine', 'dims', 'volumes' (relative path -> float32 array as
    written), 'streamlines' (relative path -> list of float64 arrays, voxel/corner) and 'dps'
    (relative path -> {'weight': float32 (N, 1)}).
    """
    subj_dir = Path(subj_dir)
    affine = make_affine() if affine is None else affine
    dims = tuple(dims)
    dwi = rng.uniform(10, 100, (*dims, nb_dwi_features)).astype(np.float32)
    t1 = rng.uniform(0, 50, dims).astype(np.float32)
    t1[0] = 0  # some voxels outside the brain, as in real T1s
    wm = np.zeros(dims, np.uint8)
    wm[1:-1, 1:-1, 1:-1] = 1
    volumes = {'dwi/dwi.nii.gz': dwi, 'anat/t1.nii.gz': t1, 'masks/wm.nii.gz': wm}
    for rel, data in volumes.items():
        write_nifti(subj_dir / rel, data, affine)
    streamlines, dps = {}, {}
    for name, n in zip(('bundle_a', 'bundle_b'), nb_streamlines):
        rel = f'tractograms/{name}.{tractogram_format}'
        sl = random_streamlines(rng, n, dims)
        weight = rng.uniform(0, 1, (n, 1)).astype(np.float32)
        write_tractogram(subj_dir / rel, sl, affine, dims, dps={'weight': weight})
        streamlines[rel], dps[rel] = sl, {'weight': weight}
    return {'affine': affine, 'dims': dims, 'volumes': volumes, 'streamlines': streamlines, 'dps': dps}


def make_database(root, subjects=('sub-01', 'sub-02', 'sub-03'), *, seed=0, tractogram_format='trk', **kwargs):
    """Write a database directory `root/<subject>/...` of `make_subject` subjects.

    Subjects get different affines (translation; every second one with a flipped x axis, i.e.
    an LAS voxel order). Returns {'root', 'config', 'subjects': subj -> make_subject truth}.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    truth = {'root': root, 'subjects': {},
             'config': default_config(tuple(f'tractograms/bundle_{x}.{tractogram_format}' for x in 'ba'))}
    for i, subj in enumerate(subjects):
        affine = make_affine(origin=rng.uniform(-30, 30, 3), flip_x=bool(i % 2))
        truth['subjects'][subj] = make_subject(root / subj, rng, affine=affine, tractogram_format=tractogram_format,
                                               **kwargs)
    return truth


def write_subject_lists(directory, training=(), validation=(), testing=()):
    "Write training.txt, validation.txt, testing.txt (one id a line); return their paths."
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, subjects in (('training', training), ('validation', validation), ('testing', testing)):
        path = directory / f'{name}.txt'
        path.write_text(''.join(f'{s}\n' for s in subjects))
        paths.append(path)
    return tuple(paths)
