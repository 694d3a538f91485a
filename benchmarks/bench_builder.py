"""Benchmark the HDF5 builder's memory: peak RSS of `create_hdf5_dataset` against the largest volume.

Writes, in a temporary directory, a database of 2 subjects, each with one 128³×45 float32 volume
(uncompressed NIfTI, ≈ 377 MB; `--quick`: 16³×8) standardized with ``'all'``, then builds its HDF5
file in fresh child processes and reads their peak RSS (VmHWM, else ``resource.getrusage``):

- ``imports``: the interpreter with dwiml_nb.hdf5 imported and nothing built — the constant;
- ``builder``: `create_hdf5_dataset` as it is (float32 in-place standardization);
- ``former standardization``: the same build with the former `standardize` (float64 copies of
  the volume), measured in the same run as the baseline.

The target is ``peak ≤ 1.2 × largest volume + imports``.

Usage::

    python benchmarks/bench_builder.py            # markdown table
    python benchmarks/bench_builder.py --json     # JSON
    python benchmarks/bench_builder.py --quick    # tiny volumes, a few seconds
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_FACTOR = 1.2


def write_database(root, nb_subjects, dim, nb_features, seed=0):
    "Subjects sub-00.. with one float32 dwi.nii each (no zero: every voxel in the default mask)."
    import nibabel as nib
    rng = np.random.default_rng(seed)
    subjects = [f'sub-{i:02d}' for i in range(nb_subjects)]
    for subj in subjects:
        data = rng.standard_normal((dim, dim, dim, nb_features), dtype=np.float32) * 50 + 1000
        (root / subj).mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, np.diag([2., 2., 2., 1.])), str(root / subj / 'dwi.nii'))
        del data
    config = {'input': {'type': 'volume', 'files': ['dwi.nii'], 'standardization': 'all'}}
    return subjects, config


def former_standardize(data, mask=None, independent=False, out=None):
    "The builder's standardization before the memory work: float64 copies of the whole volume."
    from dwiml_nb.core import DataError
    from dwiml_nb.hdf5 import STD_EPSILON
    mask = np.all(data != 0, axis=-1) if mask is None else np.asarray(mask, bool)
    values = data[mask].astype(np.float64)
    if values.shape[0] == 0:
        raise DataError('the standardization mask selects no voxel')
    axis = 0 if independent else None
    mean, std = values.mean(axis=axis), values.std(axis=axis)
    return ((data - mean) / np.maximum(std, STD_EPSILON)).astype(np.float32)


def child(mode, root, out, subjects, config):
    "Run in a fresh process: import, optionally build, report peak RSS (MB) and CPU seconds."
    import dwiml_nb.hdf5 as hdf5
    start = time.process_time()
    if mode != 'imports':
        if mode == 'former':
            hdf5.standardize = former_standardize
        hdf5.create_hdf5_dataset(root, out, config, subjects, [], [], overwrite=True, progress=False)
    return {'mode': mode, 'peak_rss_mb': peak_rss_mb(), 'cpu_seconds': time.process_time() - start}


def peak_rss_mb():
    """This process's peak RSS, MB: VmHWM (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` survives ``exec``: a child would report its parent's size at fork time if
    that were larger. VmHWM belongs to this process's own address space.
    """
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('VmHWM:'): return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == 'darwin' else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def run_child(mode, root, out, subjects, config):
    spec = json.dumps({'mode': mode, 'root': str(root), 'out': str(out), 'subjects': subjects, 'config': config})
    run = subprocess.run([sys.executable, __file__, '--child', spec], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f'child {mode} failed:\n{run.stderr[-3000:]}')
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny volumes (16³×8), for the test suite')
    p.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    p.add_argument('--subjects', type=int, default=2)
    p.add_argument('--dim', type=int, default=128)
    p.add_argument('--features', type=int, default=45)
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec['mode'], Path(spec['root']), Path(spec['out']), spec['subjects'], spec['config'])))
        return
    dim, features = (16, 8) if args.quick else (args.dim, args.features)
    volume_mb = dim ** 3 * features * 4 / 2 ** 20
    with tempfile.TemporaryDirectory() as d:
        root, out = Path(d) / 'db', Path(d) / 'out.hdf5'
        subjects, config = write_database(root, args.subjects, dim, features)
        rows = {mode: run_child(mode, root, out, subjects, config) for mode in ('imports', 'builder', 'former')}
    constant = rows['imports']['peak_rss_mb']
    target = TARGET_FACTOR * volume_mb + constant
    result = {'nb_subjects': args.subjects, 'volume_shape': [dim, dim, dim, features],
              'largest_volume_mb': volume_mb, 'imports_rss_mb': constant, 'target_mb': target,
              'rows': [{**r, 'above_imports_mb': r['peak_rss_mb'] - constant,
                        'above_imports_over_volume': (r['peak_rss_mb'] - constant) / volume_mb} for r in rows.values()],
              'builder_within_target': rows['builder']['peak_rss_mb'] <= target}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f'{args.subjects} subjects × {dim}³×{features} float32 volume ({volume_mb:.1f} MB each), '
          f"standardization 'all'; target: peak ≤ {TARGET_FACTOR} × volume + imports = {target:.0f} MB\n")
    print('| process | peak RSS (MB) | above imports (MB) | above imports / volume | CPU s |')
    print('|---|---:|---:|---:|---:|')
    names = {'imports': 'imports only (the constant)', 'builder': 'builder',
             'former': 'builder, former float64 standardization (baseline)'}
    for r in result['rows']:
        print(f"| {names[r['mode']]} | {r['peak_rss_mb']:.0f} | {r['above_imports_mb']:.0f} | "
              f"{r['above_imports_over_volume']:.2f} | {r['cpu_seconds']:.1f} |")
    print(f"\nbuilder within target: {result['builder_within_target']}")


if __name__ == '__main__':
    main()
