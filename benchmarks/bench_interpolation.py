"""Speed of trilinear interpolation: the fused numba kernel against a naive numpy 8-corner gather.

    python benchmarks/bench_interpolation.py            # markdown table
    python benchmarks/bench_interpolation.py --json     # the same figures as JSON
    python benchmarks/bench_interpolation.py --quick    # tiny sizes, a few seconds (smoke test)

A 128×128×128×45 float32 volume, 1M streamline-like points (random walks with small steps, in
voxel / corner space), one thread (``torch.set_num_threads(1)``; the kernel is single-threaded).
Figures are points per **CPU second** of this process (``time.process_time``), the best of
``--repeat`` runs taken round-robin, so that load from other processes on a shared machine hits
all candidates alike. Each row, measured in the same process:

- the kernel (`interpolate_with_neighborhood` writing into a preallocated ``out=``), with and
  without prefetching;
- the baseline: a naive numpy gather of the 8 corners of the same neighbour points (indices and
  weights per corner, ``flat[idx]`` then a weighted sum), on a subset (its rate per point does not
  depend on the count, and the full run would take minutes);
- the memory-write ceiling: ``np.copyto`` of the same output bytes into the same (mapped) buffer,
  i.e. the rate no kernel writing that output can beat.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time

import numpy as np
import torch

from dwiml_nb.interpolation import _interpolate_numba, interpolate_with_neighborhood, neighborhood_offsets

BASELINE_CHUNK = 65536        # samples (points × offsets) per numpy chunk: keeps its N×8×F temporary small


def streamline_like_points(rng, shape, nb_points, points_per_streamline=100, step=0.3):
    "Random walks (steps N(0, step) voxels per axis) starting anywhere inside the volume."
    nb_streamlines = max(nb_points // points_per_streamline, 1)
    size = np.asarray(shape[:3], dtype=np.float64)
    starts = rng.uniform(0.1, 0.9, (nb_streamlines, 1, 3)) * size
    walks = starts + np.cumsum(rng.normal(scale=step, size=(nb_streamlines, points_per_streamline, 3)), axis=1)
    return np.clip(walks, 0, size).reshape(-1, 3)


def numpy_gather_baseline(volume, coords, offsets):
    "Naive numpy: for every neighbour point, indices and weights of its 8 corners, flat[idx], weighted sum."
    size_x, size_y, size_z, nb_features = volume.shape
    flat = volume.reshape(-1, nb_features)
    samples = (coords[:, None, :] + offsets[None]).reshape(-1, 3)
    last = np.array([size_x - 1, size_y - 1, size_z - 1], dtype=np.float64)
    out = np.empty((len(samples), nb_features), np.float32)
    for start in range(0, len(samples), BASELINE_CHUNK):
        u = np.minimum(np.maximum(samples[start:start + BASELINE_CHUNK] - 0.5, 0), last)
        low = np.floor(u)
        t = (u - low).astype(np.float32)
        low = low.astype(np.int64)
        high = np.minimum(low + 1, last.astype(np.int64))
        acc = np.zeros((len(u), nb_features), np.float32)
        for corner in itertools.product((0, 1), repeat=3):
            ix, iy, iz = (high[:, a] if c else low[:, a] for a, c in enumerate(corner))
            weight = np.prod([t[:, a] if c else 1 - t[:, a] for a, c in enumerate(corner)], axis=0)
            acc += weight[:, None] * flat[(ix * size_y + iy) * size_z + iz]
        out[start:start + BASELINE_CHUNK] = acc
    return out.reshape(len(coords), -1)


def best_cpu_times(candidates, repeat):
    "Best CPU time of each candidate, run round-robin so that load from other processes hits all alike."
    best = {name: float('inf') for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - start)
    return best


def run(shape, nb_points, baseline_samples, repeat, seed=0):
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    volume = torch.from_numpy(rng.random(shape, dtype=np.float32))
    coords = streamline_like_points(rng, shape, nb_points)
    n, volume_np = len(coords), volume.numpy()

    start = time.perf_counter()
    interpolate_with_neighborhood(volume[:2, :2, :2], coords[:2], np.zeros((1, 3)))   # JIT / cache load
    warmup_s = time.perf_counter() - start

    rows = []
    for label, offsets in (('none', np.zeros((1, 3))), ('axes r=1', neighborhood_offsets('axes', 1)),
                           ('grid r=1', neighborhood_offsets('grid', 1))):
        k = len(offsets)
        sub = coords[:max(baseline_samples // k, 1)]
        # the same answer first: a benchmark of a wrong kernel means nothing
        np.testing.assert_allclose(interpolate_with_neighborhood(volume, sub, offsets).numpy(),
                                   numpy_gather_baseline(volume_np, sub, offsets), atol=1e-5)
        out = torch.empty(n, k * shape[3])
        out_np = out.numpy()
        candidates = {
            'kernel': lambda: interpolate_with_neighborhood(volume, coords, offsets, out=out),
            'no_prefetch': lambda: _interpolate_numba(volume_np, coords, offsets, out=out_np, prefetch_ahead=0),
            'baseline': lambda: numpy_gather_baseline(volume_np, sub, offsets),
            'write_ceiling': lambda: np.copyto(out_np, 1.0),
        }
        best = best_cpu_times(candidates, repeat)
        row = {'neighborhood': label, 'offsets': k, 'points': n, 'baseline_points': len(sub)}
        for name, seconds in best.items():
            row[f'{name}_points_per_cpu_s'] = (len(sub) if name == 'baseline' else n) / max(seconds, 1e-9)
        row['kernel_vs_baseline'] = row['kernel_points_per_cpu_s'] / row['baseline_points_per_cpu_s']
        row['kernel_vs_ceiling'] = row['kernel_points_per_cpu_s'] / row['write_ceiling_points_per_cpu_s']
        rows.append(row)
    return {'volume_shape': shape, 'nb_points': n, 'threads': torch.get_num_threads(), 'warmup_s': warmup_s,
            'repeat': repeat, 'torch': torch.__version__, 'machine': platform.processor() or platform.machine(),
            'rows': rows}


def markdown(result):
    lines = [f"Volume {'×'.join(map(str, result['volume_shape']))} float32, {result['nb_points']:,} streamline-like "
             f"points, {result['threads']} thread, points per CPU second (best of {result['repeat']}; first call / "
             f"JIT cache load: {result['warmup_s']:.2f} s).", '',
             '| neighborhood | kernel (pts/CPU-s) | no prefetch | naive numpy gather | kernel / gather '
             '| write ceiling (np.copyto) | kernel / ceiling |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for r in result['rows']:
        lines.append(f"| {r['neighborhood']} ({r['offsets']} offsets) | {r['kernel_points_per_cpu_s'] / 1e6:.2f} M "
                     f"| {r['no_prefetch_points_per_cpu_s'] / 1e6:.2f} M | {r['baseline_points_per_cpu_s'] / 1e6:.3f} M "
                     f"| {r['kernel_vs_baseline']:.1f}× | {r['write_ceiling_points_per_cpu_s'] / 1e6:.2f} M "
                     f"| {r['kernel_vs_ceiling']:.2f} |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    parser.add_argument('--quick', action='store_true', help='tiny sizes, a few seconds (smoke test, same code path)')
    parser.add_argument('--points', type=int, default=None, help='number of points (default 1,000,000)')
    parser.add_argument('--repeat', type=int, default=None, help='runs per figure; the best is kept (default 3)')
    args = parser.parse_args(argv)
    if args.quick:
        shape, points, baseline_samples, repeat = (16, 16, 16, 45), 2000, 8192, 1
    else:
        shape, points, baseline_samples, repeat = (128, 128, 128, 45), 1_000_000, 262144, 3
    result = run(shape, args.points or points, baseline_samples, args.repeat or repeat)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
