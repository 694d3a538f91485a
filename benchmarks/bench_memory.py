"""Memory over a long run: does resident memory stay flat across epochs (no leak)?

Many epochs on the demo phantom with 2 DataLoader workers, measured two ways in this process:

- **ours**: `DWIMLAbstractTrainer.train_and_validate()` (validation, CSV logs, model files and a
  checkpoint every epoch included);
- **baseline**: a bare loop (DataLoader with the same samplers and 2 workers, forward, loss,
  backward, step), no validation, no logs, no checkpoints.

RSS (psutil) of the main process is read at the end of each epoch; the workers' RSS (the sum over
the main process's children) is read after every batch and its per-epoch maximum kept (workers
are restarted each epoch). The reported slope is a least-squares fit of MB against the epoch,
after `--warmup` epochs (allocator pools, caches and the first checkpoint settle first). A leak of
one batch per epoch would show as a slope of about a batch's size (~1 MB here); flat is ~0.

    .venv/bin/python benchmarks/bench_memory.py [--epochs 30] [--batches 8] [--quick] [--json]
"""
import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

for _var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader

from dwiml_nb.data import make_demo_dataset
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.models import DirectionGetterModel, compute_loss_on_batch
from dwiml_nb.please_copy_and_adapt.train_model import DirectionGetterTrainer, make_samplers

BATCH_SIZE = 50
NUM_WORKERS = 2
MB = 1024 ** 2


def rss_main():
    return psutil.Process().memory_info().rss / MB


def rss_workers():
    total = 0.
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss / MB
        except psutil.Error:   # a worker that just exited
            pass
    return total


class MemoryProbe:
    "Trainer callback (and bare-loop helper): main RSS per epoch, max workers' RSS within each epoch."
    def __init__(self):
        self.main, self.workers, self._epoch_workers = [], [], 0.

    def on_batch_end(self, trainer=None, record=None):
        self._epoch_workers = max(self._epoch_workers, rss_workers())

    def on_epoch_end(self, trainer=None, record=None):
        gc.collect()
        self.main.append(rss_main())
        self.workers.append(self._epoch_workers)
        self._epoch_workers = 0.


def build(hdf5_file, batches):
    ds = MultiSubjectDataset(hdf5_file).load_data(progress=False)
    train, valid = make_samplers(ds, 'input', 'streamlines', batch_size=BATCH_SIZE, step_size=1.0,
                                 max_batches_per_epoch_training=batches, max_batches_per_epoch_validation=2)
    torch.manual_seed(0)
    return DirectionGetterModel(ds.nb_features['input'] * 7, hidden_size=32), train, valid


def bare_loop(hdf5_file, epochs, batches):
    model, train, _ = build(hdf5_file, batches)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = MemoryProbe()
    start = time.perf_counter()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        loader = DataLoader(train.source_data, batch_sampler=train, collate_fn=train.load_batch,
                            num_workers=NUM_WORKERS)
        for batch in loader:
            # As the trainer does: a no-op when the workers interpolated (make_samplers' samplers do)
            batch = train.add_inputs(batch)
            optimizer.zero_grad()
            loss, _ = compute_loss_on_batch(model, batch, 'cpu')
            loss.backward()
            optimizer.step()
            probe.on_batch_end()
        del loader
        probe.on_epoch_end()
    return probe, time.perf_counter() - start


def with_trainer(hdf5_file, epochs, batches, folder):
    model, train, valid = build(hdf5_file, batches)
    probe = MemoryProbe()
    trainer = DirectionGetterTrainer(model, folder, 'bench_memory', train, valid, learning_rate=1e-3,
                                     max_epochs=epochs, num_workers=NUM_WORKERS, progress=False,
                                     checkpoint_every_n_batches=4, callbacks=[probe])
    start = time.perf_counter()
    trainer.train_and_validate()
    return probe, time.perf_counter() - start


def slope(values, warmup):
    "Least-squares MB per epoch after the warm-up epochs."
    y = np.asarray(values[warmup:], np.float64)
    if len(y) < 2: return float('nan')
    return float(np.polyfit(np.arange(len(y)), y, 1)[0])


def summary(probe, seconds, warmup):
    return dict(seconds=seconds,
                main_mb_first=probe.main[warmup], main_mb_last=probe.main[-1],
                main_slope_mb_per_epoch=slope(probe.main, warmup),
                workers_mb_first=probe.workers[warmup], workers_mb_last=probe.workers[-1],
                workers_slope_mb_per_epoch=slope(probe.workers, warmup),
                main_mb_per_epoch=[round(v, 2) for v in probe.main],
                workers_mb_per_epoch=[round(v, 2) for v in probe.workers])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--batches', type=int, default=8, help='training batches per epoch')
    parser.add_argument('--warmup', type=int, default=3, help='epochs left out of the slope')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    parser.add_argument('--quick', action='store_true', help='4 epochs of 2 batches (smoke test, same code path)')
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.batches, args.warmup = 4, 2, 1
    if args.epochs < args.warmup + 2:
        parser.error('--epochs must exceed --warmup by at least 2')
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        hdf5_file = make_demo_dataset(Path(d) / 'demo', which='phantom', nb_subjects=4,
                                      progress=False).hdf5_files['phantom']
        base = summary(*bare_loop(hdf5_file, args.epochs, args.batches), args.warmup)
        ours = summary(*with_trainer(hdf5_file, args.epochs, args.batches, Path(d) / 'exp'), args.warmup)
    result = dict(epochs=args.epochs, batches_per_epoch=args.batches, warmup=args.warmup, batch_size=BATCH_SIZE,
                  num_workers=NUM_WORKERS, load_average=os.getloadavg()[0], ours=ours, baseline=base,
                  main_slope_difference_mb_per_epoch=ours['main_slope_mb_per_epoch'] - base['main_slope_mb_per_epoch'])
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.epochs} epochs x {args.batches} batches of {BATCH_SIZE} streamlines, {NUM_WORKERS} workers; "
          f"slopes after {args.warmup} warm-up epochs\n")
    print('| run | main RSS first → last (MB) | main slope (MB/epoch) | workers RSS first → last (MB) '
          '| workers slope (MB/epoch) | time (s) |')
    print('|---|---:|---:|---:|---:|---:|')
    for name, r in (('ours (trainer)', ours), ('baseline (bare loop)', base)):
        print(f"| {name} | {r['main_mb_first']:.1f} → {r['main_mb_last']:.1f} | {r['main_slope_mb_per_epoch']:+.3f} "
              f"| {r['workers_mb_first']:.1f} → {r['workers_mb_last']:.1f} | {r['workers_slope_mb_per_epoch']:+.3f} "
              f"| {r['seconds']:.0f} |")
    print(f"\nmain-process slope, ours minus baseline: {result['main_slope_difference_mb_per_epoch']:+.3f} MB/epoch")


if __name__ == '__main__':
    main()
