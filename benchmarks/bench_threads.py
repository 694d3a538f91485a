"""Training steps per second with torch's default thread count and with the trainer's choice.

torch starts with one intra-op thread per core. The trainer sets its own count unless the user chose
one (`dwiml_nb.trainer.choose_torch_threads`: half of the cores that DataLoader workers leave, at
least 1). This benchmark times the example model's training step (forward, cosine loss, backward,
clipping, Adam step) on batches of the demo phantom loaded beforehand, so only the compute and the
threads differ:

- **baseline**: torch's default thread count (what runs when nothing sets it);
- **ours**: the count `choose_torch_threads()` gives for `num_workers=0`;

each on a quiet machine and with a competing load (one busy process per core, as a second job or
DataLoader workers would be), in this same process.

    .venv/bin/python benchmarks/bench_threads.py [--steps 40] [--quick] [--json]
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get('OMP_NUM_THREADS'):
    sys.exit('unset OMP_NUM_THREADS: this benchmark compares thread counts itself')

import torch

from dwiml_nb.data import make_demo_dataset
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.models import DirectionGetterModel, compute_loss_on_batch
from dwiml_nb.please_copy_and_adapt.train_model import make_samplers
from dwiml_nb.trainer import choose_torch_threads, usable_cores

DEFAULT_THREADS = torch.get_num_threads()   # read before anything changes it


def _spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class CompetingLoad:
    "One busy process per core for at most `seconds` (they stop by themselves)."
    def __init__(self, nb_processes, seconds):
        self.nb_processes, self.seconds, self.procs = nb_processes, seconds, []

    def __enter__(self):
        ctx = mp.get_context('spawn')
        self.procs = [ctx.Process(target=_spin, args=(self.seconds,), daemon=True) for _ in range(self.nb_processes)]
        for p in self.procs: p.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs: p.terminate()
        for p in self.procs: p.join()


def load_batches(hdf5_file, nb_batches):
    ds = MultiSubjectDataset(hdf5_file).load_data(progress=False)
    train, _ = make_samplers(ds, 'input', 'streamlines', batch_size=100, step_size=1.0)
    plan = train.epoch_plan(0)
    return [train.load_batch(plan[i % len(plan)]) for i in range(nb_batches)], ds.nb_features['input'] * 7


def steps_per_second(batches, nb_inputs, threads, steps):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DirectionGetterModel(nb_inputs, hidden_size=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = compute_loss_on_batch(model, batch, 'cpu')
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step(batches[0])   # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=40, help='timed training steps per case')
    parser.add_argument('--quick', action='store_true', help='2 steps, quiet case only (the test suite runs this)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    args = parser.parse_args(argv)
    steps = 2 if args.quick else args.steps
    ours, why = choose_torch_threads(None, num_workers=0)
    with tempfile.TemporaryDirectory() as d:
        demo = make_demo_dataset(Path(d) / 'demo', which='phantom', nb_subjects=3, progress=False)
        batches, nb_inputs = load_batches(demo.hdf5_files['phantom'], min(steps, 8))
    cores = usable_cores()
    rows = []
    for load in ('quiet',) if args.quick else ('quiet', 'busy'):
        # Bounded: the load stops by itself even if this process dies.
        budget = 30 + 20 * steps
        with (CompetingLoad(cores, budget) if load == 'busy' else _nothing()):
            base = steps_per_second(batches, nb_inputs, DEFAULT_THREADS, steps)
            mine = steps_per_second(batches, nb_inputs, ours, steps)
        rows.append({'machine': load, 'baseline_threads': DEFAULT_THREADS, 'baseline_steps_per_s': base,
                     'ours_threads': ours, 'ours_steps_per_s': mine, 'ratio': mine / base})
    torch.set_num_threads(DEFAULT_THREADS)
    if args.json:
        print(json.dumps({'cores': cores, 'choice': why, 'rows': rows}, indent=2))
        return
    print(f'{cores} usable cores; the trainer chooses {ours} thread(s) ({why}); batches of 100 streamlines, '
          f'{steps} steps per case; busy = one spinning process per core.\n')
    print('| machine | torch default: threads | steps/s | trainer\'s choice: threads | steps/s | ratio |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['machine']} | {r['baseline_threads']} | {r['baseline_steps_per_s']:.1f} | {r['ours_threads']} | "
              f"{r['ours_steps_per_s']:.1f} | {r['ratio']:.2f}× |")


class _nothing:
    def __enter__(self): return self
    def __exit__(self, *exc): pass


if __name__ == '__main__':
    main()
