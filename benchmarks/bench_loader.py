"""How fast the batch loader feeds a model, beside a simple per-streamline baseline.

On a generated dataset (one 128×128×128×45 float32 volume, tens of thousands of streamlines,
written in dwi_ml's HDF5 layout) this measures points/s and streamlines/s of

(a) interpolation alone, on a batch of ~50k points: `dwiml_nb.interpolation` against a plain
    torch gather of the 8 corners (baseline);
(b) the full `load_batch` (read + resample to 1 mm + split/reverse/noise + interpolate) through a
    real DataLoader, in RAM and lazy mode, without neighbourhood and with axes r=1, with 0 and 2
    workers, against a per-streamline loop (h5py read of each streamline, dipy
    `set_number_of_points`, plain torch gather on the batch; no augmentation, so the baseline is
    flattered).

Every figure comes with the baseline measured in the same process, and peak memory (PSS of the
process and its workers, so pages shared after fork count once, sampled every 50 ms during the
run; the dataset is written by a child process so that its buffers do not count). Throughput is
given per wall-clock second and, for 0 workers, per CPU second of the process: on a shared
machine the CPU figure is the one-core speed, the wall figure what the trainer would see. Targets (checked in the summary):
RAM mode with 0 workers ≥ 1M points/s on one core; lazy within 2× of RAM; 2 workers ≥ 1.6× the
throughput of 0 workers (the main process alone = one core).

Usage::

    .venv/bin/python benchmarks/bench_loader.py              # markdown table (~1-2 minutes)
    .venv/bin/python benchmarks/bench_loader.py --json       # the same figures as JSON
    .venv/bin/python benchmarks/bench_loader.py --quick      # a small dataset, a few seconds
"""
from __future__ import annotations

import os

# "One core" means one: a multi-threaded BLAS on a shared 2-core machine turns a 100k×3 @ 3×3
# product into tens of ms of spinning (measured: 29 ms of CPU instead of 0.5 ms).
for _var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMBA_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import torch
from dipy.tracking.streamlinespeed import set_number_of_points
from torch.utils.data import DataLoader

from dwiml_nb.core import offsets_from_lengths
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.interpolation import interpolate_with_neighborhood, neighborhood_offsets, trilinear_interpolation
from dwiml_nb.sampler import BatchStreamlinesSamplerOneInput

STEP_MM = 1.0
AUGMENT = dict(split_ratio=0.3, reverse_ratio=0.5, noise_gaussian_size=0.1)


# --- the dataset ------------------------------------------------------------------------------

def random_walks(rng, nb_streamlines, dims, voxel_size, min_mm=20., max_mm=120., step_mm=0.5):
    "Smooth random walks in voxel space (corner origin), packed: (data float32, lengths int64)."
    lengths = np.maximum((rng.uniform(min_mm, max_mm, nb_streamlines) / step_mm).astype(np.int64), 2)
    offsets = offsets_from_lengths(lengths)
    point_sl = np.repeat(np.arange(nb_streamlines), lengths)
    first = np.zeros(len(point_sl), bool)
    first[offsets] = True
    # A direction per point that drifts slowly along the streamline (per-streamline cumsum).
    turns = rng.normal(scale=0.08, size=(len(point_sl), 3))
    turns[first] = rng.normal(size=(nb_streamlines, 3))
    directions = np.cumsum(turns, axis=0)
    directions -= np.repeat(np.cumsum(turns, axis=0)[offsets] - turns[offsets], lengths, axis=0)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    steps = directions * (step_mm / voxel_size)
    steps[first] = 0
    walk = np.cumsum(steps, axis=0)
    walk -= np.repeat(walk[offsets], lengths, axis=0)
    starts = rng.uniform(0.3, 0.7, size=(nb_streamlines, 3)) * np.asarray(dims)
    points = np.clip(walk + np.repeat(starts, lengths, axis=0), 0, np.asarray(dims) - 1e-3)
    return points.astype(np.float32), lengths


def write_dataset(path, *, dims=(128, 128, 128), nb_features=45, nb_streamlines=40_000, voxel_size=1.25, seed=0):
    "A dwi_ml-layout HDF5: one big training subject, one tiny validation subject."
    rng = np.random.default_rng(seed)
    vlen = h5py.string_dtype()
    config = {'input': {'type': 'volume', 'files': ['dwi.nii.gz'], 'standardization': 'none'},
              'streamlines': {'type': 'streamlines', 'files': ['tracts.trk']}}
    with h5py.File(path, 'w') as f:
        f.attrs['data_and_time'] = time.strftime('%d %B %Y %X')
        f.attrs['chosen_subjs'] = np.array(['big', 'tiny'], dtype=vlen)
        f.attrs['training_subjs'] = np.array(['big'], dtype=vlen)
        f.attrs['validation_subjs'] = np.array(['tiny'], dtype=vlen)
        f.attrs['testing_subjs'] = np.array([], dtype=vlen)
        f.attrs['groups_config'] = str(config)
        for key in ('step_size', 'nb_points', 'compress'):
            f.attrs[key] = 'Not defined by user'
        for subj, subj_dims, n in (('big', dims, nb_streamlines), ('tiny', (8, 8, 8), 10)):
            affine = np.diag([voxel_size] * 3 + [1.])
            volume = f.create_group(f'{subj}/input')
            volume.attrs.update(type='volume', affine=affine, voxres=np.full(3, voxel_size, np.float32),
                                nb_features=np.int64(nb_features))
            data = volume.create_dataset('data', shape=(*subj_dims, nb_features), dtype=np.float32)
            for x in range(subj_dims[0]):   # slab by slab: no second copy of a 400 MB volume
                data[x] = rng.standard_normal((*subj_dims[1:], nb_features), dtype=np.float32)
            points, lengths = random_walks(rng, n, subj_dims, voxel_size)
            seg = np.linalg.norm(np.diff(points, axis=0) * voxel_size, axis=1)
            offsets = offsets_from_lengths(lengths)
            seg[offsets[1:] - 1] = 0
            euclid = np.bincount(np.repeat(np.arange(n), lengths)[:-1], weights=seg, minlength=n)
            g = f.create_group(f'{subj}/streamlines')
            g.attrs.update(type='streamlines', space='Space.VOX', origin='Origin.TRACKVIS', affine=affine,
                           dimensions=np.array(subj_dims, np.int16), voxel_sizes=np.full(3, voxel_size, np.float32),
                           voxel_order='RAS')
            g.create_dataset('data', data=points)
            g.create_dataset('offsets', data=offsets)
            g.create_dataset('lengths', data=lengths)
            g.create_dataset('euclidean_lengths', data=euclid)
    return path


# --- measuring --------------------------------------------------------------------------------

class PeakMemory:
    "Peak PSS (MB) of this process plus its children, sampled in a thread while the block runs."
    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                pss = me.memory_full_info().pss + sum(c.memory_full_info().pss for c in me.children(recursive=True))
            except psutil.Error:
                pss = 0
            self.peak = max(self.peak, pss)
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = self.peak / 2**20


def timed(fn, repeat=1):
    "Best wall time and best CPU time (this process) of `repeat` calls, and the last result."
    best, best_cpu, result = math.inf, math.inf, None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
        best = min(best, time.perf_counter() - start)
    return best, best_cpu, result


def plain_gather_trilinear(volume, coords):
    "The baseline interpolation: clamp, then gather the 8 corners with advanced indexing."
    dims = torch.tensor(volume.shape[:3], dtype=coords.dtype)
    x = torch.minimum(torch.clamp(coords - 0.5, min=0), dims - 1)
    lo = x.floor().long()
    hi = torch.minimum(lo + 1, dims.long() - 1)
    t = x - lo
    out = 0
    for corner in range(8):
        pick = [(corner >> axis) & 1 for axis in range(3)]
        ix, iy, iz = (hi[:, a] if pick[a] else lo[:, a] for a in range(3))
        w = torch.ones(len(x))
        for a in range(3):
            w = w * (t[:, a] if pick[a] else 1 - t[:, a])
        out = out + w[:, None] * volume[ix, iy, iz]
    return out


def baseline_batch(h5_path, parts, volume, step_mm, voxel_size, offsets_k):
    "One batch the obvious way: a read and a dipy resampling per streamline, then a plain gather."
    out = []
    with h5py.File(h5_path, 'r') as f:
        g = f['big/streamlines']
        data, offsets, lengths = g['data'], g['offsets'], g['lengths']
        for _, ids in parts:
            for sid in ids:
                o, n = int(offsets[sid]), int(lengths[sid])
                s = data[o:o + n].astype(np.float64)
                length_mm = np.linalg.norm(np.diff(s, axis=0) * voxel_size, axis=1).sum()
                out.append(set_number_of_points(s, max(2, math.ceil(length_mm / step_mm))))
    points = torch.from_numpy(np.concatenate(out).astype(np.float32))
    neighbours = (points[:, None, :] + torch.from_numpy(offsets_k).float()[None]).reshape(-1, 3)
    inputs = plain_gather_trilinear(volume, neighbours).reshape(len(points), -1)
    return len(out), len(points), inputs


def run_loader(sampler, num_workers):
    """Two epochs through one DataLoader with persistent workers: (cold, warm) measurements.

    The first epoch pays once-per-process costs (worker start-up, loading numba's compiled
    kernels, reading the volume into the lazy cache); the second is the steady state a training
    run lives in. Each measurement is (wall s, CPU s of this process, streamlines, points).
    """
    loader = DataLoader(sampler.source_data, batch_sampler=sampler, collate_fn=sampler.load_batch,
                        num_workers=num_workers, persistent_workers=num_workers > 0)
    out = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        start, start_cpu = time.perf_counter(), time.process_time()
        nb_streamlines = nb_points = 0
        for batch in loader:
            batch = sampler.add_inputs(batch)   # no-op unless the workers left the inputs to us
            nb_streamlines += len(batch)
            nb_points += batch.nb_points
        out.append((time.perf_counter() - start, time.process_time() - start_cpu, nb_streamlines, nb_points))
    del loader
    return out


# --- the benchmark ----------------------------------------------------------------------------

def bench(h5_path, *, batch_points, nb_batches, baseline_batches, interp_repeat):
    rows = []
    ram = MultiSubjectDataset(h5_path).load_data(progress=False).training_set
    volume = ram.get_volume(0, 'input')
    voxel_size = float(ram.get_streamline_info(0, 'streamlines').voxel_sizes[0])
    neighborhoods = {'none': {}, 'axes r=1': dict(neighborhood_type='axes', neighborhood_radius=1)}

    def sampler_for(subset, neighborhood, batches, inputs_in_workers=True):
        return BatchStreamlinesSamplerOneInput(
            subset, 'streamlines', 'input', batch_size=batch_points, batch_size_units='nb_points', step_size=STEP_MM,
            max_batches_per_epoch=batches, seed=1, inputs_in_workers=inputs_in_workers, **AUGMENT,
            **neighborhoods[neighborhood])

    # (a) interpolation alone, on the points of a real batch
    torch.set_num_threads(1)
    batch = sampler_for(ram, 'none', 1).load_batch(sampler_for(ram, 'none', 1).epoch_plan(0)[0])
    coords = torch.from_numpy(batch.streamlines.data)
    for name, kw in neighborhoods.items():
        offsets = neighborhood_offsets(kw.get('neighborhood_type'), kw.get('neighborhood_radius', 0))
        ours = (lambda: trilinear_interpolation(volume, coords)) if not kw else \
            (lambda: interpolate_with_neighborhood(volume, coords, offsets))
        base_coords = (coords[:, None, :] + torch.from_numpy(np.asarray(offsets)).float()[None]).reshape(-1, 3)
        t_ours, cpu_ours, _ = timed(ours, interp_repeat)
        t_base, cpu_base, _ = timed(lambda: plain_gather_trilinear(volume, base_coords), interp_repeat)
        rows.append(dict(part='(a) interpolation', mode='RAM', neighborhood=name, workers=0,
                         points_per_s=len(coords) / t_ours, streamlines_per_s=len(batch) / t_ours,
                         points_per_cpu_s=len(coords) / cpu_ours, baseline_points_per_s=len(coords) / t_base,
                         baseline_points_per_cpu_s=len(coords) / cpu_base, speedup=cpu_base / cpu_ours, peak_mb=None))

    # (b) the full load_batch through a DataLoader, and the per-streamline baseline
    baseline = {}
    for name in neighborhoods:
        sampler = sampler_for(ram, name, baseline_batches)
        offsets = sampler._offsets[0].astype(np.float32)
        plan = sampler.epoch_plan(0)
        t, cpu, results = timed(lambda: [baseline_batch(h5_path, parts, volume, STEP_MM, voxel_size, offsets)
                                         for parts in plan])
        baseline[name] = (sum(r[1] for r in results) / t, sum(r[1] for r in results) / cpu)
    lazy = MultiSubjectDataset(h5_path, lazy=True).load_data(progress=False).training_set
    configs = [(mode, subset, name, workers, True) for mode, subset in (('RAM', ram), ('lazy', lazy))
               for name in neighborhoods for workers in (0, 2)]
    # Workers that send only the points, the main process interpolating (inputs_in_workers=False).
    configs += [('RAM', ram, name, 2, False) for name in neighborhoods]
    for mode, subset, name, workers, inputs_in_workers in configs:
        torch.set_num_threads(1)
        sampler = sampler_for(subset, name, nb_batches, inputs_in_workers)
        with PeakMemory() as memory:
            (t_cold, _, _, pts_cold), (t, cpu, nb_streamlines, nb_points) = run_loader(sampler, workers)
        rows.append(dict(part='(b) load_batch', mode=mode, neighborhood=name,
                         workers=workers if inputs_in_workers else f'{workers}, inputs in main',
                         points_per_s=nb_points / t, streamlines_per_s=nb_streamlines / t,
                         first_epoch_points_per_s=pts_cold / t_cold,
                         points_per_cpu_s=nb_points / cpu if workers == 0 else None,
                         baseline_points_per_s=baseline[name][0], baseline_points_per_cpu_s=baseline[name][1],
                         speedup=(nb_points / cpu / baseline[name][1] if workers == 0
                                  else nb_points / t / baseline[name][0]),
                         peak_mb=memory.peak_mb))
    return rows


def targets(rows):
    "The three targets of the issue, from the (b) rows."
    loader = {(r['mode'], r['neighborhood'], r['workers']): r for r in rows if r['part'] == '(b) load_batch'}
    get = {k: r['points_per_s'] for k, r in loader.items()}
    out = []
    for name in ('none', 'axes r=1'):
        ram0, lazy0, ram2 = get[('RAM', name, 0)], get[('lazy', name, 0)], get[('RAM', name, 2)]
        one_core = loader[('RAM', name, 0)]['points_per_cpu_s']
        ram2_main = get[('RAM', name, '2, inputs in main')]
        out += [dict(target=f'RAM, 0 workers, {name}: >= 1M points per CPU-s', value=one_core, ok=one_core >= 1e6),
                dict(target=f'2 workers (inputs in main) / 0 workers, RAM, {name}: >= 1.6', value=ram2_main / ram0,
                     ok=ram2_main / ram0 >= 1.6),
                dict(target=f'lazy / RAM, 0 workers, {name}: >= 0.5', value=lazy0 / ram0, ok=lazy0 / ram0 >= 0.5),
                dict(target=f'2 workers / 0 workers, RAM, {name}: >= 1.6', value=ram2 / ram0, ok=ram2 / ram0 >= 1.6)]
    return out


def markdown(result):
    lines = ['| part | mode | neighbourhood | workers | points/s | points/CPU-s | streamlines/s | baseline points/s '
             '| baseline points/CPU-s | speed-up | first epoch points/s | peak MB |',
             '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    def num(x): return '' if x is None else f'{x:,.0f}'
    for r in result['rows']:
        lines.append(f"| {r['part']} | {r['mode']} | {r['neighborhood']} | {r['workers']} | {num(r['points_per_s'])} "
                     f"| {num(r['points_per_cpu_s'])} | {num(r['streamlines_per_s'])} | {num(r['baseline_points_per_s'])} "
                     f"| {num(r['baseline_points_per_cpu_s'])} | {r['speedup']:.1f}× | {num(r.get('first_epoch_points_per_s'))} "
                     f"| {num(r['peak_mb'])} |")
    lines += ['', '| target | value | met |', '|---|---:|---|']
    for t in result['targets']:
        value = f"{t['value']:,.0f}" if t['value'] > 100 else f"{t['value']:.2f}"
        lines.append(f"| {t['target']} | {value} | {'yes' if t['ok'] else '**no**'} |")
    s = result['setup']
    lines += ['', f"Dataset: volume {s['dims']}×{s['nb_features']} float32, {s['nb_streamlines']:,} streamlines; "
              f"batches of {s['batch_points']:,} points (step {STEP_MM} mm, {AUGMENT}), {s['nb_batches']} batches "
              f"per epoch; figures from the second epoch of one DataLoader with persistent workers (the first, "
              f"cold epoch, with worker start-up and volume reads, is shown apart); {os.cpu_count()} CPUs, load average {s['load_average']:.1f} at the start (on a shared "
              f"machine, CPU-s figures and ratios are more reliable than wall-clock ones); speed-up = ours / "
              f"baseline per CPU-s (0 workers) or per second (2 workers); total {s['seconds']:.0f} s."]
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--json', action='store_true', help='print the results as JSON instead of a markdown table')
    parser.add_argument('--quick', action='store_true', help='a small dataset (smoke test, a few seconds)')
    parser.add_argument('--nb-streamlines', type=int, default=None)
    parser.add_argument('--workdir', type=Path, default=None, help='where to write the dataset (default: a temp dir)')
    parser.add_argument('--write-dataset', type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument('--dims', type=int, nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_dataset:   # the child process that writes the dataset
        write_dataset(args.write_dataset, dims=tuple(args.dims[:3]), nb_features=args.dims[3],
                      nb_streamlines=args.nb_streamlines)
        return 0
    start = time.perf_counter()
    if args.quick:
        setup = dict(dims=(32, 32, 32), nb_features=8, nb_streamlines=args.nb_streamlines or 2000,
                     batch_points=5000, nb_batches=4, baseline_batches=1, interp_repeat=2)
    else:
        setup = dict(dims=(128, 128, 128), nb_features=45, nb_streamlines=args.nb_streamlines or 40_000,
                     batch_points=50_000, nb_batches=16, baseline_batches=3, interp_repeat=5)
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        h5_path = Path(tmp) / 'bench.hdf5'
        subprocess.run([sys.executable, __file__, '--write-dataset', str(h5_path), '--nb-streamlines',
                        str(setup['nb_streamlines']), '--dims', *map(str, setup['dims']), str(setup['nb_features'])],
                       check=True)
        rows = bench(h5_path, batch_points=setup['batch_points'], nb_batches=setup['nb_batches'],
                     baseline_batches=setup['baseline_batches'], interp_repeat=setup['interp_repeat'])
    result = {'setup': {**setup, 'seconds': time.perf_counter() - start, 'torch': torch.__version__,
                        'cpus': os.cpu_count(), 'load_average': load_average},
              'rows': rows, 'targets': targets(rows)}
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
