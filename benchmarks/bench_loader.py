"""How fast the batch loader feeds a model: `load_batch` per CPU-second, and 2 DataLoader workers vs 1 process.

On a generated dataset in dwi_ml's HDF5 layout (one 128×128×128×45 float32 volume, 40,000
streamlines, loaded in RAM), with batches of 512 streamlines resampled to 0.5 mm and augmented
(split / reverse / noise), without neighbourhood and with 'axes' r=1, this measures

(a) the full `load_batch` (read + resample + augment + interpolate) in this process: points per
    **CPU second** (``time.process_time``, one thread), beside a naive per-streamline baseline run
    in the same process on the same batches (an h5py read and a dipy `set_number_of_points` per
    streamline, then a plain torch 8-corner gather of every neighbour point; no augmentation, so
    the baseline is flattered);
(b) a real DataLoader with 2 workers against 0 workers (the main process alone, one core):
    points per **wall-clock** second, the best of a few epochs after a first one that pays the
    workers' start-up. The target (#13.3) is >= 1.7× on a 2-core machine; on a machine shared with
    other work the ratio is bounded by the cores actually free, so the load average at the start is
    printed, and 2 plain forked processes splitting the same batches (nothing sent, no DataLoader)
    show what the machine allows two loaders. Beside it, the CPU time a worker spends sending one
    batch (pickling it into the result queue), as a share of `load_batch`: with the inputs in
    private memory (how workers sent them before: torch copies them to shared memory) and in the
    worker's reused shared buffers (how they send them now).

Only the public API is used: the sampler's constructor, iterating it, ``load_batch(parts)``.

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
import functools
import json
import math
import multiprocessing
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import h5py
import numpy as np
import torch
from dipy.tracking.streamlinespeed import set_number_of_points
from torch.utils.data import DataLoader

from dwiml_nb.core import offsets_from_lengths
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.interpolation import SHARED_BUFFERS, neighborhood_offsets
from dwiml_nb.sampler import BatchStreamlinesSamplerOneInput

STEP_MM = 0.5
AUGMENT = dict(split_ratio=0.3, reverse_ratio=0.5, noise_gaussian_size=0.1)
NEIGHBORHOODS = {'none': {}, 'axes r=1': dict(neighborhood_type='axes', neighborhood_radius=1)}
WORKERS_TARGET = 1.7
EPOCHS_TIMED = 2     # steady-state epochs timed per DataLoader, after the start-up one


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


def baseline_batch(h5_path, parts, volume, voxel_size, offsets):
    "One batch the obvious way: a read and a dipy resampling per streamline, then a plain gather."
    out = []
    with h5py.File(h5_path, 'r') as f:
        g = f['big/streamlines']
        data, starts, lengths = g['data'], g['offsets'], g['lengths']
        for _, ids in parts:
            for sid in ids:
                o, n = int(starts[sid]), int(lengths[sid])
                s = data[o:o + n].astype(np.float64)
                length_mm = np.linalg.norm(np.diff(s, axis=0) * voxel_size, axis=1).sum()
                out.append(set_number_of_points(s, max(2, math.ceil(length_mm / STEP_MM))))
    points = torch.from_numpy(np.concatenate(out).astype(np.float32))
    neighbours = (points[:, None, :] + torch.from_numpy(offsets).float()[None]).reshape(-1, 3)
    inputs = plain_gather_trilinear(volume, neighbours).reshape(len(points), -1)
    return len(points), inputs


def cpu_timed(fn):
    "CPU seconds (this process) of one call, and its result."
    start = time.process_time()
    result = fn()
    return time.process_time() - start, result


def send_cpu(batch, repeats=3):
    """CPU seconds per batch a DataLoader worker spends pickling ``batch`` into its result queue.

    'private': its inputs in private memory, as workers had them before #13.3: torch moves them to
    shared memory (a copy into fresh, page-faulted pages). 'shared': its inputs in one of the
    worker's reused shared buffers (`interpolation.SHARED_BUFFERS`, what `load_batch` does in a
    worker now): only the buffer's handle is written. Each pickle is read back (as the main process
    would), which lets the shared buffer be reused.
    """
    cost = {}
    for way in ('private', 'shared'):
        total = 0.
        for _ in range(repeats):
            inputs = batch.inputs.clone() if way == 'private' else SHARED_BUFFERS.empty(batch.inputs.shape)
            inputs.copy_(batch.inputs)
            sent = replace(batch, inputs=inputs)
            del inputs
            cpu, data = cpu_timed(functools.partial(ForkingPickler.dumps, sent))
            total += cpu
            del sent
            pickle.loads(data)
        cost[way] = total / repeats
    return cost


def loader_cpu_seconds():
    "CPU seconds used so far by this process and its live children (the DataLoader's workers; Linux /proc)."
    total = time.process_time()
    for child in multiprocessing.active_children():
        try:
            fields = Path(f'/proc/{child.pid}/stat').read_text().rsplit(')', 1)[1].split()
        except OSError:   # no /proc here, or the child just ended
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    return total


def loader_points_per_s(subset, sampler, num_workers):
    """Points per wall-clock second and per CPU second, and cores used, of one DataLoader with persistent workers.

    The first epoch pays once-per-process costs (worker start-up, loading numba's compiled kernels);
    the next ones are the steady state a training run lives in: the best of them is kept. CPU
    seconds are those of the main process and its workers together (``/proc`` tick resolution):
    with other work on the machine, points per CPU second tell what the pipeline costs, whatever
    the cores it was given.
    """
    loader = DataLoader(subset, batch_sampler=sampler, collate_fn=sampler.load_batch, num_workers=num_workers,
                        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)
    epochs = []
    for _ in range(1 + EPOCHS_TIMED):
        start, cpu_start, nb_points = time.perf_counter(), loader_cpu_seconds(), 0
        for batch in loader:
            assert batch.inputs is not None, 'the batches must come complete (inputs interpolated in the workers)'
            nb_points += batch.nb_points
        wall, cpu = time.perf_counter() - start, loader_cpu_seconds() - cpu_start
        epochs.append((nb_points / wall, nb_points / max(cpu, 1e-9), cpu / wall))
    del loader
    return max(epochs[1:])          # the best steady-state epoch: the least disturbed by other work


def _load_share(sampler, plan, barrier, results):
    "In a forked process: load ``plan`` after the others are ready; report (start, end, points)."
    sampler.load_batch(plan[0])                  # its output buffers mapped, like a worker's after epoch 1
    barrier.wait()
    start = time.perf_counter()
    points = sum(sampler.load_batch(parts).nb_points for parts in plan)
    results.put((start, time.perf_counter(), points))


def processes_points_per_s(sampler, nb_processes):
    """Points per wall-clock second of ``nb_processes`` forked processes splitting one epoch's batches, no DataLoader.

    Nothing crosses a process boundary but three numbers: on 2 cores, 2 processes over 1 is what
    the machine itself allows two loaders (memory bandwidth and shared caches included), the
    ceiling of the 2-worker DataLoader ratio.
    """
    context = multiprocessing.get_context('fork')
    plan = list(sampler)
    barrier, results = context.Barrier(nb_processes), context.Queue()
    processes = [context.Process(target=_load_share, args=(sampler, plan[i::nb_processes], barrier, results))
                 for i in range(nb_processes)]
    for process in processes: process.start()
    reports = [results.get() for _ in processes]
    for process in processes: process.join()
    return sum(p for _, _, p in reports) / (max(e for _, e, _ in reports) - min(s for s, _, _ in reports))


# --- the benchmark ----------------------------------------------------------------------------

def bench(h5_path, *, batch_size, nb_batches, baseline_batches, worker_batches):
    torch.set_num_threads(1)
    ram = MultiSubjectDataset(h5_path).load_data(progress=False).training_set
    volume = ram.get_volume(0, 'input')
    voxel_size = float(ram.get_streamline_info(0, 'streamlines').voxel_sizes[0])

    def sampler_for(name, batches):
        return BatchStreamlinesSamplerOneInput(
            ram, 'streamlines', 'input', batch_size=batch_size, batch_size_units='nb_streamlines',
            step_size=STEP_MM, max_batches_per_epoch=batches, seed=1, **AUGMENT, **NEIGHBORHOODS[name])

    rows = []
    for name, kw in NEIGHBORHOODS.items():
        offsets = np.asarray(neighborhood_offsets(kw.get('neighborhood_type'), kw.get('neighborhood_radius', 0)))
        sampler = sampler_for(name, nb_batches)
        plan = list(sampler)
        sampler.load_batch(plan[0])                 # JIT / cache load outside the timings
        # One batch alive at a time, as in training: keeping them all would time fresh-page faults.
        cpu, points = cpu_timed(lambda: sum(sampler.load_batch(parts).nb_points for parts in plan))
        send = send_cpu(sampler.load_batch(plan[0]))
        base_plan = plan[:baseline_batches]
        base_cpu, base = cpu_timed(lambda: [baseline_batch(h5_path, p, volume, voxel_size, offsets) for p in base_plan])
        base_points = sum(n for n, _ in base)
        # Epochs long enough that the wait for an epoch's first batch and its last worker's tail (a
        # batch each) do not count for much: a training epoch has hundreds of batches.
        single, single_per_cpu, _ = loader_points_per_s(ram, sampler_for(name, worker_batches), 0)
        double, double_per_cpu, cores = loader_points_per_s(ram, sampler_for(name, worker_batches), 2)
        ceiling = (processes_points_per_s(sampler_for(name, worker_batches), 2)
                   / processes_points_per_s(sampler_for(name, worker_batches), 1))
        rows.append(dict(neighborhood=name, offsets=len(offsets), batches=len(plan),
                         points_per_batch=points / max(len(plan), 1), points_per_cpu_s=points / max(cpu, 1e-9),
                         baseline_points_per_cpu_s=base_points / max(base_cpu, 1e-9),
                         speedup=(points / max(cpu, 1e-9)) / (base_points / max(base_cpu, 1e-9)),
                         send_private_share=send['private'] * len(plan) / max(cpu, 1e-9),
                         send_shared_share=send['shared'] * len(plan) / max(cpu, 1e-9),
                         workers0_points_per_s=single, workers2_points_per_s=double, workers_ratio=double / single,
                         workers2_cores_used=cores, workers_cpu_efficiency=double_per_cpu / single_per_cpu,
                         processes_ratio=ceiling))
    return rows


def markdown(result):
    s = result['setup']
    lines = ['| neighbourhood | points/batch | load_batch points/CPU-s | baseline points/CPU-s | speed-up '
             '| worker sends a batch, % of load_batch: private inputs (before) / shared buffers (now) '
             '| 0 workers points/s | 2 workers points/s | 2 workers / 0 | 2 workers: cores used '
             '| 2 workers / 0, points per CPU-s | 2 plain processes / 1 (the ceiling) |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in result['rows']:
        ok = '' if r['workers_ratio'] >= WORKERS_TARGET else ' (< 1.7)'
        lines.append(f"| {r['neighborhood']} ({r['offsets']} offsets) | {r['points_per_batch']:,.0f} "
                     f"| {r['points_per_cpu_s']:,.0f} | {r['baseline_points_per_cpu_s']:,.0f} | {r['speedup']:.1f}× "
                     f"| {100 * r['send_private_share']:.0f}% / {100 * r['send_shared_share']:.1f}% "
                     f"| {r['workers0_points_per_s']:,.0f} | {r['workers2_points_per_s']:,.0f} "
                     f"| {r['workers_ratio']:.2f}×{ok} | {r['workers2_cores_used']:.2f} "
                     f"| {r['workers_cpu_efficiency']:.2f} | {r['processes_ratio']:.2f}× |")
    lines += ['', f"Dataset: volume {s['dims']}×{s['nb_features']} float32 in RAM, {s['nb_streamlines']:,} streamlines; "
              f"batches of {s['batch_size']} streamlines (step {STEP_MM} mm, {AUGMENT}), {s['nb_batches']} batches; "
              f"baseline on the first {s['baseline_batches']} of them. Workers: wall-clock points/s of the best of "
              f"{EPOCHS_TIMED} epochs of {s['worker_batches']} batches (after a start-up one) of one DataLoader "
              f"with persistent workers; {s['cpus']} CPUs, load average "
              f"{s['load_average']:.1f} at the start (a shared machine bounds the 2-worker ratio by the cores free: "
              "'cores used' is the CPU time of the main process and the workers over the wall time, and the "
              "points per CPU-second of 2 workers over those of 0 workers bound what 2 free cores give, "
              "about twice that ratio; '2 plain processes / 1' splits the same batches between 2 forked processes "
              "that send nothing, no DataLoader: what this machine allows two loaders); "
              f"total {s['seconds']:.0f} s."]
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
    if args.write_dataset:   # the child process that writes the dataset (its buffers die with it)
        write_dataset(args.write_dataset, dims=tuple(args.dims[:3]), nb_features=args.dims[3],
                      nb_streamlines=args.nb_streamlines)
        return 0
    start = time.perf_counter()
    if args.quick:
        setup = dict(dims=(24, 24, 24), nb_features=8, nb_streamlines=args.nb_streamlines or 400,
                     batch_size=32, nb_batches=3, baseline_batches=1, worker_batches=4)
    else:
        setup = dict(dims=(128, 128, 128), nb_features=45, nb_streamlines=args.nb_streamlines or 40_000,
                     batch_size=512, nb_batches=16, baseline_batches=2, worker_batches=64)
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        h5_path = Path(tmp) / 'bench.hdf5'
        if args.quick:      # small: written here, no second interpreter to start
            write_dataset(h5_path, dims=setup['dims'], nb_features=setup['nb_features'],
                          nb_streamlines=setup['nb_streamlines'])
        else:
            subprocess.run([sys.executable, __file__, '--write-dataset', str(h5_path), '--nb-streamlines',
                            str(setup['nb_streamlines']), '--dims', *map(str, setup['dims']),
                            str(setup['nb_features'])], check=True)
        rows = bench(h5_path, batch_size=setup['batch_size'], nb_batches=setup['nb_batches'],
                     baseline_batches=setup['baseline_batches'], worker_batches=setup['worker_batches'])
    result = {'setup': {**setup, 'seconds': time.perf_counter() - start, 'torch': torch.__version__,
                        'cpus': os.cpu_count(), 'load_average': load_average}, 'rows': rows}
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
