"""Tracking speed: seeds per second of `track_streamlines` (every streamline advanced together) against
tracking one seed at a time in a Python loop (the baseline), measured in the same process.

    python benchmarks/bench_tracking.py            # markdown table (~1 minute)
    python benchmarks/bench_tracking.py --quick    # a smaller run (< 30 s), for tests
    python benchmarks/bench_tracking.py --json     # the same figures as JSON

The model is the example `DirectionGetterModel` (LSTM, 64 units, one previous direction), untrained
(the cost of a step does not depend on the weights), its inputs the trilinear interpolation of a
64×64×64×32 float32 volume at each point and its 6 axis neighbours (224 features), as for the demo.
Both directions from each seed, steps of 1 mm in 1 mm voxels, up to ``max_length`` mm, no mask and
``theta`` 180° so that only the volume's border and the length stop a streamline: every method
tracks the same seeds over the same steps. One torch thread. Times are CPU times
(``time.process_time``), each the best of ``--repeat`` runs; the baseline tracks the first
``baseline_seeds`` seeds (its rate per seed does not depend on their number).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

from dwiml_nb.interpolation import neighborhood_offsets
from dwiml_nb.models import DirectionGetterModel
from dwiml_nb.tracking import model_inputs_fn, track_streamlines

SHAPE = (64, 64, 64)
NB_FEATURES = 32


def setup(seed=0):
    "The model, its input function and the seed points."
    rng = np.random.default_rng(seed)
    volume = rng.uniform(0, 1, SHAPE + (NB_FEATURES,)).astype(np.float32)
    offsets = neighborhood_offsets('axes', 1)
    torch.manual_seed(seed)
    model = DirectionGetterModel(NB_FEATURES * len(offsets), hidden_size=64).eval()
    return model, model_inputs_fn(volume, offsets)


def cpu_seconds(run, repeat):
    "Best CPU time of `repeat` calls of run() and its last result."
    best, result = float('inf'), None
    for _ in range(repeat):
        start = time.process_time()
        result = run()
        best = min(best, time.process_time() - start)
    return best, result


def measure(nb_seeds, baseline_seeds, max_length, repeat):
    model, inputs = setup()
    seeds = np.random.default_rng(1).uniform(16, 48, (nb_seeds, 3)).astype(np.float32)
    kwargs = dict(shape=SHAPE, step_size_mm=1.0, theta=180., min_length=0., max_length=max_length)

    def batched(s): return lambda: track_streamlines(model, inputs, s, **kwargs)[0]

    def one_at_a_time(s):
        def run():
            return [track_streamlines(model, inputs, s[i:i + 1], **kwargs)[0] for i in range(len(s))]
        return run

    batched(seeds[:2])()   # warm-up: numba compiles the interpolation kernel on its first call
    rows = []
    for method, n, run in (('batched (ours)', nb_seeds, batched(seeds)),
                           ('batched (ours)', baseline_seeds, batched(seeds[:baseline_seeds])),
                           ('one seed at a time (baseline)', baseline_seeds, one_at_a_time(seeds[:baseline_seeds]))):
        seconds, out = cpu_seconds(run, repeat)
        points = out.nb_points if hasattr(out, 'nb_points') else sum(o.nb_points for o in out)
        rows.append({'method': method, 'nb_seeds': n, 'cpu_s': seconds, 'seeds_per_s': n / seconds,
                     'points_per_s': points / seconds})
    baseline = rows[-1]['seeds_per_s']
    for row in rows:
        row['speedup'] = row['seeds_per_s'] / baseline
    return rows


def markdown(result):
    lines = [f"Tracking, {result['max_length']:g} mm max, both directions, DirectionGetterModel (LSTM 64) on "
             f"{NB_FEATURES}×7 inputs, 1 torch thread, CPU time, best of {result['repeat']} "
             f"({result['machine']}):", '',
             '| method | seeds | CPU s | seeds/s | points/s | vs baseline |', '|---|---:|---:|---:|---:|---:|']
    for r in result['rows']:
        lines.append(f"| {r['method']} | {r['nb_seeds']} | {r['cpu_s']:.2f} | {r['seeds_per_s']:.0f} | "
                     f"{r['points_per_s']:.0f} | {r['speedup']:.1f}× |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='fewer seeds and shorter streamlines (< 30 s)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    parser.add_argument('--repeat', type=int, default=None, help='runs per figure, the best kept (default 3, quick 1)')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    nb_seeds, baseline_seeds, max_length = (200, 10, 30.) if args.quick else (2000, 40, 60.)
    repeat = args.repeat or (1 if args.quick else 3)
    result = {'machine': f'{platform.processor() or platform.machine()}, python {sys.version.split()[0]}, '
                         f'torch {torch.__version__}',
              'max_length': max_length, 'repeat': repeat,
              'rows': measure(nb_seeds, baseline_seeds, max_length, repeat)}
    print(json.dumps(result, indent=2) if args.json else markdown(result))


if __name__ == '__main__':
    main()
