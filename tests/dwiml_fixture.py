"""Write a small HDF5 file exactly as dwi_ml's own builder (`dwiml_create_hdf5_dataset`) does.

Follows the layout dwi_ml's builder writes, specified in `docs/hdf5_layout.md` ("dwi_ml writes"
columns), attribute by attribute and dtype by dtype, so that tests prove we read dwi_ml's files
*without conversion*. The writer returns the values it
wrote (the ground truth) so tests can compare every value that comes back.

    truth = write_dwiml_hdf5(tmp_path / 'data.hdf5')
    truth['subjects']['sub-02']['streamlines']['streamlines']   # list of (n_i, 3) float64 arrays
"""
from __future__ import annotations

import datetime
from pathlib import Path

import h5py
import numpy as np

NOT_DEFINED = 'Not defined by user'


def random_streamlines(rng, nb_streamlines, dims, min_points=2, max_points=30):
    "Random walks inside a volume of shape `dims` (voxel space, corner origin), float64."
    lengths = rng.integers(min_points, max_points + 1, nb_streamlines)
    dims = np.asarray(dims, dtype=np.float64)
    out = []
    for n in lengths:
        start = rng.uniform(0.2, 0.8, 3) * dims
        steps = rng.normal(scale=0.5, size=(n, 3))
        steps[0] = 0
        out.append(np.clip(start + np.cumsum(steps, axis=0), 0, dims - 1e-3))
    return out


def _euclidean_lengths_mm(streamlines, voxel_sizes):
    return np.array([np.linalg.norm(np.diff(s, axis=0) * voxel_sizes, axis=1).sum() for s in streamlines],
                    dtype=np.float64)


def default_config(dps_keys=('weight',)):
    "A groups config like the ones dwi_ml users write (two volume groups, one streamline group)."
    return {
        'input': {'type': 'volume', 'files': ['dwi/dwi_sh.nii.gz', 'anat/t1.nii.gz'],
                  'standardization': 'per_file', 'std_mask': ['masks/wm.nii.gz']},
        'wm_mask': {'type': 'volume', 'files': ['masks/wm.nii.gz'], 'standardization': 'none'},
        'streamlines': {'type': 'streamlines', 'files': ['tractograms/*.trk'], 'dps_keys': list(dps_keys)},
    }


def write_dwiml_hdf5(path, *, training=('sub-03', 'sub-01'), validation=('sub-04',), testing=('sub-02',),
                     dims=(6, 7, 5), nb_features=None, nb_streamlines=(40, 25, 60, 12),
                     step_size=None, nb_points=None, compress=None, seed=0, config=None,
                     voxel_order='RAS'):
    """Write a dwi_ml-layout HDF5 file; return the ground truth written.

    Parameters
    ----------
    path : str or Path
    training, validation, testing : sequence of str
        Subject ids of each subset; ``chosen_subjs`` is their union in an unsorted order.
    dims : 3-tuple
        Volume shape (X, Y, Z).
    nb_features : dict group -> int, optional
        Features per volume group (default: input 4, wm_mask 1).
    nb_streamlines : sequence of int
        Streamlines per subject, cycled over the subjects.
    step_size, nb_points, compress : float or None
        As dwi_ml's options; None is written as 'Not defined by user'. With ``step_size`` the
        streamline data (and euclidean lengths) are float32, otherwise float64.
    seed : int
    config : dict, optional
        The groups config (default: `default_config()`).

    Returns
    -------
    dict with 'config', 'chosen_subjs', 'training_subjs', 'validation_subjs', 'testing_subjs',
    'step_size', 'nb_points', 'compress', and 'subjects': subj -> group -> dict of the values
    written ('data' and 'affine' for volumes; 'streamlines' (list of arrays as stored),
    'lengths', 'offsets', 'euclidean_lengths', 'dps', attrs for streamline groups).
    """
    rng = np.random.default_rng(seed)
    config = default_config() if config is None else config
    nb_features = {'input': 4, 'wm_mask': 1} if nb_features is None else nb_features
    chosen = [*testing, *training, *validation]  # dwi_ml keeps the user's order: not sorted
    float_dtype = np.float32 if step_size is not None else np.float64
    truth = {'config': config, 'chosen_subjs': chosen, 'training_subjs': list(training),
             'validation_subjs': list(validation), 'testing_subjs': list(testing),
             'step_size': step_size, 'nb_points': nb_points, 'compress': compress, 'subjects': {}}
    vlen_str = h5py.string_dtype()
    with h5py.File(path, 'w') as f:
        f.attrs['data_and_time'] = datetime.datetime.now().strftime('%d %B %Y %X')
        f.attrs['chosen_subjs'] = np.array(chosen, dtype=vlen_str)
        f.attrs['groups_config'] = str(config)
        f.attrs['training_subjs'] = np.array(list(training), dtype=vlen_str)
        f.attrs['validation_subjs'] = np.array(list(validation), dtype=vlen_str)
        f.attrs['testing_subjs'] = np.array(list(testing), dtype=vlen_str)
        f.attrs['step_size'] = NOT_DEFINED if step_size is None else step_size
        f.attrs['nb_points'] = NOT_DEFINED if nb_points is None else nb_points
        f.attrs['compress'] = NOT_DEFINED if compress is None else compress
        for i, subj in enumerate(chosen):
            subj_truth = truth['subjects'][subj] = {}
            subj_group = f.create_group(subj)
            voxres = np.array([1.0, 1.25, 2.0], dtype=np.float32)
            affine = np.diag([*voxres.astype(np.float64), 1.0])
            affine[:3, 3] = rng.uniform(-50, 50, 3)
            for group, group_conf in config.items():
                g = subj_group.create_group(group)
                if group_conf['type'] == 'volume':
                    nf = nb_features[group]
                    data = rng.normal(size=(*dims, nf)).astype(np.float32)
                    g.attrs['type'] = 'volume'
                    g.attrs['affine'] = affine
                    g.attrs['voxres'] = voxres
                    g.attrs['nb_features'] = np.int64(nf)
                    g.create_dataset('data', data=data)
                    subj_truth[group] = {'data': data, 'affine': affine, 'voxres': voxres}
                    continue
                n = nb_streamlines[i % len(nb_streamlines)]
                streamlines = [s.astype(float_dtype) for s in random_streamlines(rng, n, dims)]
                lengths = np.array([len(s) for s in streamlines], dtype=np.int64)
                offsets = (np.cumsum(lengths) - lengths).astype(np.int64)
                euclid = _euclidean_lengths_mm(streamlines, voxres).astype(float_dtype)
                dps = {k: rng.normal(size=(n, 1)).astype(np.float32) for k in group_conf.get('dps_keys', [])}
                attrs = {'type': 'streamlines', 'space': 'Space.VOX', 'origin': 'Origin.TRACKVIS',
                         'affine': affine, 'dimensions': np.array(dims, dtype=np.int16),
                         'voxel_sizes': voxres, 'voxel_order': voxel_order}
                for k, v in attrs.items():
                    g.attrs[k] = v
                g.create_dataset('data', data=np.concatenate(streamlines) if n else np.zeros((0, 3), float_dtype))
                g.create_dataset('offsets', data=offsets)
                g.create_dataset('lengths', data=lengths)
                g.create_dataset('euclidean_lengths', data=euclid)
                dps_group = g.create_group('data_per_streamline')  # dwi_ml writes it, empty without dps_keys
                for k, v in dps.items():
                    dps_group.create_dataset(k, data=v)
                subj_truth[group] = {'streamlines': streamlines, 'lengths': lengths, 'offsets': offsets,
                                     'euclidean_lengths': euclid, 'dps': dps, 'attrs': attrs}
    return truth


def read_streamline_slowly(path, subj, group, sid):
    "The obvious reference: one h5py read per streamline, as float32."
    with h5py.File(path, 'r') as f:
        g = f[subj][group]
        o, n = int(g['offsets'][sid]), int(g['lengths'][sid])
        return g['data'][o:o + n].astype(np.float32)


def read_streamlines_slowly(path, subj, group, ids):
    "`read_streamline_slowly` for each id in `ids`, with one open file."
    with h5py.File(path, 'r') as f:
        g = f[subj][group]
        offsets, lengths, data = g['offsets'], g['lengths'], g['data']
        out = []
        for sid in ids:
            o, n = int(offsets[sid]), int(lengths[sid])
            out.append(data[o:o + n].astype(np.float32))
        return out


if __name__ == '__main__':
    import sys
    out = Path(sys.argv[1] if len(sys.argv) > 1 else 'dwiml_fixture.hdf5')
    write_dwiml_hdf5(out)
    print(out)
