"""Speed of trilinear interpolation: the fused numba kernel against a plain torch gather.

    python benchmarks/bench_interpolation.py            # markdown table
    python benchmarks/bench_interpolation.py --json     # the same figures as JSON

A 128×128×128×45 float32 volume, ~1M streamline-like points (random walks with small steps,
in voxel / corner space), one core (``torch.set_num_threads(1)``; the kernel is single-threaded).
The baseline is measured in the same run: a plain torch 8-corner gather, ``flat[idx]`` of shape
N×8×F then a weighted sum, run in chunks of 131072 samples (its N×8×F temporary would otherwise
be 1.4 GB per million points) on the first 262144 samples (points × offsets: its rate per point
does not depend on the count, and the full run would take minutes); the same subset is used for
our torch backend. Each figure is the best of ``--repeat`` runs.
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

from dwiml_nb.interpolation import (_interpolate_numba, interpolate_with_neighborhood, neighborhood_offsets,
                                    trilinear_interpolation)

BASELINE_CHUNK = 131072
BASELINE_SAMPLES = 262144


def streamline_like_points(rng, shape, nb_points, points_per_streamline=100, step=0.3):
    "Random walks (steps N(0, step) voxels per axis) starting anywhere inside the volume."
    nb_streamlines = nb_points // points_per_streamline
    size = np.asarray(shape[:3], dtype=np.float64)
    starts = rng.uniform(0.1, 0.9, (nb_streamlines, 1, 3)) * size
    walks = starts + np.cumsum(rng.normal(scale=step, size=(nb_streamlines, points_per_streamline, 3)), axis=1)
    return np.clip(walks, 0, size).reshape(-1, 3)


def torch_gather_baseline(volume, coords, offsets):
    "Plain torch: indices and weights of the 8 corners, flat[idx] (N×8×F), weighted sum."
    size_x, size_y, size_z, nb_features = volume.shape
    flat = volume.reshape(-1, nb_features)
    samples = (coords[:, None, :] + offsets[None]).reshape(-1, 3)
    last = torch.tensor([size_x - 1, size_y - 1, size_z - 1], dtype=samples.dtype)
    out = torch.empty(len(samples), nb_features)
    for start in range(0, len(samples), BASELINE_CHUNK):
        u = torch.minimum((samples[start:start + BASELINE_CHUNK] - 0.5).clamp(min=0), last)
        low = u.floor()
        t = (u - low).float()
        low = low.long()
        high = torch.minimum(low + 1, last.long())
        idx, weights = [], []
        for corner in itertools.product((0, 1), repeat=3):
            i = [high[:, a] if c else low[:, a] for a, c in enumerate(corner)]
            idx.append((i[0] * size_y + i[1]) * size_z + i[2])
            weights.append(torch.stack([t[:, a] if c else 1 - t[:, a] for a, c in enumerate(corner)]).prod(0))
        idx, weights = torch.stack(idx, 1), torch.stack(weights, 1)
        out[start:start + BASELINE_CHUNK] = (flat[idx] * weights[..., None]).sum(1)
    return out.reshape(len(coords), -1)


def best_times(candidates, repeat):
    "Best wall time of each candidate, run round-robin so that load from other processes hits all alike."
    best = {name: float('inf') for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def run(nb_points, repeat, seed=0):
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    shape = (128, 128, 128, 45)
    volume = torch.from_numpy(rng.random(shape, dtype=np.float32))
    coords = torch.from_numpy(streamline_like_points(rng, shape, nb_points))
    n = len(coords)
    volume_np, coords_np = volume.numpy(), coords.numpy()

    start = time.perf_counter()
    trilinear_interpolation(volume[:2, :2, :2], coords[:2])   # JIT (or cache load) outside timings
    warmup_s = time.perf_counter() - start

    # the same answer first: a benchmark of a wrong kernel means nothing
    offsets_axes = neighborhood_offsets('axes', 1)
    for offsets in (np.zeros((1, 3)), offsets_axes):
        fused = interpolate_with_neighborhood(volume, coords[:20000], offsets)
        base = torch_gather_baseline(volume, coords[:20000], torch.from_numpy(offsets))
        assert torch.allclose(fused, base, atol=1e-5), 'fused kernel and baseline disagree'

    rows = []
    for label, offsets in (('none', np.zeros((1, 3))), ('axes r=1', offsets_axes)):
        k = len(offsets)
        sub = coords[:BASELINE_SAMPLES // k]
        candidates = {
            'fused': lambda: interpolate_with_neighborhood(volume, coords, offsets),
            'fused_no_prefetch': lambda: _interpolate_numba(volume_np, coords_np, offsets, prefetch_ahead=0),
            'torch_backend': lambda: interpolate_with_neighborhood(volume, sub, offsets, backend='torch'),
            'baseline': lambda: torch_gather_baseline(volume, sub, torch.from_numpy(offsets)),
        }
        if k > 1:
            # the unfused alternative: materialize N·K shifted points, then the plain kernel
            def materialized():
                shifted = (coords_np[:, None, :] + offsets[None]).reshape(-1, 3)
                return _interpolate_numba(volume_np, shifted, np.zeros((1, 3))).reshape(n, -1)
            candidates['materialized'] = materialized
        best = best_times(candidates, repeat)
        row = {'neighborhood': label, 'offsets': k, 'points': n}
        for name, seconds in best.items():
            row[f'{name}_points_per_s'] = (len(sub) if name in ('torch_backend', 'baseline') else n) / seconds
        row['speedup_vs_baseline'] = row['fused_points_per_s'] / row['baseline_points_per_s']
        rows.append(row)
    return {'volume_shape': shape, 'nb_points': n, 'threads': torch.get_num_threads(), 'warmup_s': warmup_s,
            'torch': torch.__version__, 'machine': platform.processor() or platform.machine(), 'rows': rows}


def markdown(result):
    lines = [f"Volume {'×'.join(map(str, result['volume_shape']))} float32, {result['nb_points']:,} streamline-like "
             f"points, {result['threads']} thread (first call / JIT cache load: {result['warmup_s']:.2f} s).", '',
             '| neighborhood | fused (pts/s) | fused, no prefetch | materialized N·K points | torch backend '
             '| plain torch gather | fused / gather |',
             '|---|---|---|---|---|---|---|']
    for r in result['rows']:
        mat = f"{r['materialized_points_per_s'] / 1e6:.2f} M" if 'materialized_points_per_s' in r else '–'
        lines.append(f"| {r['neighborhood']} ({r['offsets']} offsets) | {r['fused_points_per_s'] / 1e6:.2f} M "
                     f"| {r['fused_no_prefetch_points_per_s'] / 1e6:.2f} M | {mat} "
                     f"| {r['torch_backend_points_per_s'] / 1e6:.2f} M | {r['baseline_points_per_s'] / 1e6:.3f} M "
                     f"| {r['speedup_vs_baseline']:.1f}× |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    parser.add_argument('--points', type=int, default=1_000_000, help='number of points (default 1,000,000)')
    parser.add_argument('--repeat', type=int, default=3, help='runs per figure; the best is kept (default 3)')
    args = parser.parse_args(argv)
    result = run(args.points, args.repeat)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
