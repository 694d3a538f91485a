"""Benchmark MultiSubjectDataset: lazy-mode memory bound and streamline read throughput.

Builds, in a temporary directory, a dwi_ml-layout HDF5 file larger than the lazy cache
(default 8 subjects, each with a 96×96×96×16 float32 volume ≈ 56 MB, and one subject with a
large float64 tractogram), then measures

- the peak RSS of a fresh process iterating over every subject's volume, lazy with
  ``cache_size=2`` versus RAM mode (each mode in its own process, so that peaks do not mix);
- streamlines/s of ``get_streamlines`` on random batches, against a baseline of one h5py slice
  read per streamline, measured in the same process on the same ids.

Usage::

    python benchmarks/bench_dataset.py            # markdown table
    python benchmarks/bench_dataset.py --json     # JSON
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

VLEN = h5py.string_dtype()


def write_benchmark_file(path, nb_subjects, dim, nb_features, nb_streamlines, seed=0):
    "A dwi_ml-layout file: one volume group per subject, streamlines (float64, as dwi_ml) for all."
    rng = np.random.default_rng(seed)
    subjects = [f'sub-{i:02d}' for i in range(nb_subjects)]
    config = {'input': {'type': 'volume', 'files': ['dwi.nii.gz'], 'standardization': 'per_file'},
              'streamlines': {'type': 'streamlines', 'files': ['bundle.trk']}}
    with h5py.File(path, 'w') as f:
        f.attrs['data_and_time'] = time.strftime('%d %B %Y %X')
        f.attrs['chosen_subjs'] = np.array(subjects, dtype=VLEN)
        f.attrs['groups_config'] = str(config)
        f.attrs['training_subjs'] = np.array(subjects[:-1], dtype=VLEN)
        f.attrs['validation_subjs'] = np.array(subjects[-1:], dtype=VLEN)
        f.attrs['testing_subjs'] = np.array([], dtype=VLEN)
        for key in ('step_size', 'nb_points', 'compress'):
            f.attrs[key] = 'Not defined by user'
        for i, subj in enumerate(subjects):
            v = f.create_group(f'{subj}/input')
            v.attrs.update({'type': 'volume', 'affine': np.eye(4), 'voxres': np.ones(3, np.float32),
                            'nb_features': np.int64(nb_features)})
            v['data'] = rng.random((dim, dim, dim, nb_features), dtype=np.float32)
            n = nb_streamlines if i == 0 else 100
            lengths = rng.integers(10, 60, n).astype(np.int64)
            s = f.create_group(f'{subj}/streamlines')
            s.attrs.update({'type': 'streamlines', 'space': 'Space.VOX', 'origin': 'Origin.TRACKVIS',
                            'affine': np.eye(4), 'dimensions': np.array([dim] * 3, np.int16),
                            'voxel_sizes': np.ones(3, np.float32), 'voxel_order': 'RAS'})
            s['data'] = rng.random((int(lengths.sum()), 3)) * dim
            s['offsets'] = np.cumsum(lengths) - lengths
            s['lengths'] = lengths
            s['euclidean_lengths'] = lengths.astype(np.float64)


def measure_volume_rss(path, lazy, cache_size):
    "Run in a fresh process: peak RSS while reading every subject's volume once."
    from dwiml_nb.dataset import MultiSubjectDataset
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    ds = MultiSubjectDataset(path, lazy=lazy, cache_size=cache_size).load_data(progress=False)
    total = 0.0
    for subset in ds.subsets.values():
        for i in range(len(subset)):
            total += float(subset.get_volume(i, 'input')[0, 0, 0, 0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {'peak_rss_mb': peak / 2**20, 'rss_above_imports_mb': (peak - before) / 2**20,
            'seconds': time.perf_counter() - t0}


def _rss_in_subprocess(path, lazy, cache_size):
    out = subprocess.run([sys.executable, __file__, '--measure-rss', str(path), str(int(lazy)), str(cache_size)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def _rate(fn, batches, min_seconds):
    "Streamlines per second of fn over the batches, repeated for at least min_seconds."
    done, t0 = 0, time.perf_counter()
    while True:
        for ids in batches:
            fn(ids)
            done += len(ids)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds: return done / elapsed


def measure_throughput(path, batch_size, nb_batches, min_seconds, seed=1):
    "get_streamlines (lazy and RAM) vs one h5py read per streamline, on the same random batches."
    from dwiml_nb.dataset import MultiSubjectDataset
    lazy = MultiSubjectDataset(path, lazy=True).load_data(progress=False).training_set
    n = lazy.nb_streamlines(0, 'streamlines')
    rng = np.random.default_rng(seed)
    random_batches = [rng.integers(0, n, batch_size) for _ in range(nb_batches)]
    # a run of neighbours, as a sampler of consecutive chunks would ask for
    chunk_batches = [np.arange(s, s + batch_size) for s in rng.integers(0, n - batch_size, nb_batches)]
    with h5py.File(path, 'r') as f:
        g = f[f'{lazy.subjects[0]}/streamlines']
        data, offsets, lengths = g['data'], g['offsets'][()], g['lengths'][()]

        def per_streamline(ids):
            return [data[o:o + k].astype(np.float32) for o, k in zip(offsets[ids].tolist(), lengths[ids].tolist())]

        rows = {}
        for name, batches in (('random ids', random_batches), ('consecutive ids', chunk_batches)):
            baseline = _rate(per_streamline, batches, min_seconds)
            ours = _rate(lambda ids: lazy.get_streamlines(0, 'streamlines', ids), batches, min_seconds)
            rows[name] = {'baseline_streamlines_per_s': baseline, 'lazy_streamlines_per_s': ours,
                          'speedup': ours / baseline}
    ram = MultiSubjectDataset(path, lazy=False).load_data(progress=False).training_set
    for name, batches in (('random ids', random_batches), ('consecutive ids', chunk_batches)):
        rows[name]['ram_streamlines_per_s'] = _rate(lambda ids: ram.get_streamlines(0, 'streamlines', ids), batches, min_seconds)
    lazy.close()
    return {'nb_streamlines_in_group': n, 'batch_size': batch_size, 'batches': rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    p.add_argument('--subjects', type=int, default=8)
    p.add_argument('--dim', type=int, default=96)
    p.add_argument('--features', type=int, default=16)
    p.add_argument('--streamlines', type=int, default=100_000, help='streamlines of the large group')
    p.add_argument('--batch-size', type=int, default=1000)
    p.add_argument('--seconds', type=float, default=1.5, help='minimum timing per measurement')
    p.add_argument('--quick', action='store_true', help='tiny sizes, a few seconds (smoke test, same code path)')
    p.add_argument('--measure-rss', nargs=3, metavar=('FILE', 'LAZY', 'CACHE'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_rss:
        file, lazy, cache = args.measure_rss
        print(json.dumps(measure_volume_rss(file, bool(int(lazy)), int(cache))))
        return
    if args.quick:
        args.subjects, args.dim, args.features, args.streamlines = 2, 16, 4, 2000
        args.batch_size, args.seconds = 100, 0.05
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'bench.hdf5'
        t0 = time.perf_counter()
        write_benchmark_file(path, args.subjects, args.dim, args.features, args.streamlines)
        volume_mb = args.dim ** 3 * args.features * 4 / 2**20
        result = {'file_mb': path.stat().st_size / 2**20, 'write_seconds': time.perf_counter() - t0,
                  'nb_subjects': args.subjects, 'volume_mb': volume_mb,
                  'lazy_cache_size_2': _rss_in_subprocess(path, True, 2),
                  'ram': _rss_in_subprocess(path, False, 2),
                  'throughput': measure_throughput(path, args.batch_size, 8, args.seconds)}
    result['lazy_over_ram_peak_memory'] = (result['lazy_cache_size_2']['rss_above_imports_mb']
                                           / result['ram']['rss_above_imports_mb'])
    if args.json:
        print(json.dumps(result, indent=2))
        return
    lz, rm = result['lazy_cache_size_2'], result['ram']
    print(f"{args.subjects} subjects × {args.dim}³×{args.features} float32 volume ({volume_mb:.0f} MB each); "
          f"file {result['file_mb']:.0f} MB\n")
    print('| volumes, all subjects once | peak RSS (MB) | above imports (MB) | seconds |')
    print('|---|---:|---:|---:|')
    print(f"| lazy, cache_size=2 | {lz['peak_rss_mb']:.0f} | {lz['rss_above_imports_mb']:.0f} | {lz['seconds']:.2f} |")
    print(f"| RAM | {rm['peak_rss_mb']:.0f} | {rm['rss_above_imports_mb']:.0f} | {rm['seconds']:.2f} |")
    print(f"\nlazy / RAM memory above imports: {result['lazy_over_ram_peak_memory']:.2f}\n")
    th = result['throughput']
    print(f"get_streamlines, batches of {th['batch_size']} out of {th['nb_streamlines_in_group']} streamlines "
          '(float64 on disk)\n')
    print('| ids | per-streamline h5py (streamlines/s) | lazy (streamlines/s) | lazy / baseline | RAM (streamlines/s) |')
    print('|---|---:|---:|---:|---:|')
    for name, r in th['batches'].items():
        print(f"| {name} | {r['baseline_streamlines_per_s']:,.0f} | {r['lazy_streamlines_per_s']:,.0f} | "
              f"{r['speedup']:.1f}× | {r['ram_streamlines_per_s']:,.0f} |")


if __name__ == '__main__':
    main()
