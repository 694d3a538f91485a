"""Training throughput of the example model on the demo phantom, and where a step's time goes.

The README's default run (demo phantom, `DirectionGetterModel`, batches of 100 streamlines
resampled to 1 mm with an 'axes' neighbourhood, augmentation on) is timed two ways in this process:

- **ours**: `DWIMLAbstractTrainer.train_and_validate()` (validation, logs and a checkpoint every
  epoch included), with `num_workers` 0 and 2. Each training step is split into *data* (waiting for
  the DataLoader's next batch) and *compute* (forward, loss, backward, clipping, optimizer step),
  measured around `compute_batch_loss` and the `on_batch_end` callback;
- **baseline**: a bare loop (DataLoader, forward, loss, backward, step) on the same samplers and
  model, no validation, no logs, no checkpoints.

    .venv/bin/python benchmarks/bench_training.py [--epochs 3] [--json]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

for _var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import torch
from torch.utils.data import DataLoader

from dwiml_nb.data import make_demo_dataset
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.models import DirectionGetterModel, compute_loss_on_batch
from dwiml_nb.please_copy_and_adapt.train_model import DirectionGetterTrainer, make_samplers

BATCH_SIZE = 100


def build(hdf5_file):
    ds = MultiSubjectDataset(hdf5_file).load_data(progress=False)
    train, valid = make_samplers(ds, 'input', 'streamlines', batch_size=BATCH_SIZE, step_size=1.0)
    torch.manual_seed(0)
    model = DirectionGetterModel(ds.nb_features['input'] * 7, hidden_size=64)
    return model, train, valid


def bare_loop(hdf5_file, epochs, num_workers):
    model, train, _ = build(hdf5_file)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(train.source_data, batch_sampler=train, collate_fn=train.load_batch, num_workers=num_workers)
    streamlines = points = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for batch in loader:
            optimizer.zero_grad()
            loss, _ = compute_loss_on_batch(model, batch, 'cpu')
            loss.backward()
            optimizer.step()
            streamlines += len(batch)
            points += batch.nb_points
    elapsed = time.perf_counter() - start
    return dict(streamlines_per_s=streamlines / elapsed, points_per_s=points / elapsed, seconds=elapsed)


class StepTimer:
    """Trainer callback: per training step, time waiting for data vs computing.

    A step's compute starts when `compute_batch_loss` is entered and ends at `on_batch_end`
    (after backward, clipping and the optimizer step); the data wait is the time from the end of
    the previous step (or the start of the epoch) to the start of this one.
    """
    def __init__(self):
        self.data_s = self.compute_s = 0.
        self.points = 0
        self._last_end = self._start = None

    def on_train_begin(self, trainer): self._last_end = time.perf_counter()
    def on_epoch_end(self, trainer, record): self._last_end = time.perf_counter()

    def step_start(self, batch):
        self._start = time.perf_counter()
        self.data_s += self._start - self._last_end
        self.points += batch.nb_points

    def on_batch_end(self, trainer, record):
        now = time.perf_counter()
        self.compute_s += now - self._start
        self._last_end = now


def with_trainer(hdf5_file, epochs, num_workers, folder):
    model, train, valid = build(hdf5_file)
    timer = StepTimer()

    class TimedTrainer(DirectionGetterTrainer):
        def compute_batch_loss(self, data, is_training):
            if is_training:
                timer.step_start(data)
            return super().compute_batch_loss(data, is_training)

    trainer = TimedTrainer(model, folder, f'bench_w{num_workers}', train, valid, learning_rate=3e-3,
                           max_epochs=epochs, clip_grad=1.0, num_workers=num_workers, progress=False,
                           callbacks=[timer])
    start = time.perf_counter()
    history = trainer.train_and_validate()
    elapsed = time.perf_counter() - start
    nb = sum(r['nb_streamlines'] for r in history)
    return dict(streamlines_per_s=nb / elapsed, points_per_s=timer.points / elapsed, seconds=elapsed,
                data_s=timer.data_s, compute_s=timer.compute_s, other_s=elapsed - timer.data_s - timer.compute_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        hdf5_file = make_demo_dataset(Path(d) / 'demo', which='phantom', progress=False).hdf5_files['phantom']
        for workers in (0, 2):
            base = bare_loop(hdf5_file, args.epochs, workers)
            ours = with_trainer(hdf5_file, args.epochs, workers, Path(d) / 'exp')
            rows.append(dict(num_workers=workers, ours=ours, baseline=base,
                             ratio=ours['streamlines_per_s'] / base['streamlines_per_s']))
    result = dict(epochs=args.epochs, batch_size=BATCH_SIZE, torch_threads=1, load_average=os.getloadavg()[0],
                  rows=rows)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print('| workers | ours streamlines/s | ours points/s | data wait | compute | validation, logs, checkpoints '
          '| bare loop streamlines/s | ours / bare |')
    print('|---:|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        o = r['ours']
        pct = lambda x: f"{100 * x / o['seconds']:.0f}%"
        print(f"| {r['num_workers']} | {o['streamlines_per_s']:,.0f} | {o['points_per_s']:,.0f} | {pct(o['data_s'])} "
              f"| {pct(o['compute_s'])} | {pct(o['other_s'])} | {r['baseline']['streamlines_per_s']:,.0f} "
              f"| {r['ratio']:.2f} |")


if __name__ == '__main__':
    main()
