"""Training throughput of the example model on the demo phantom, and where a step's time goes.

The README's default run (demo phantom, `DirectionGetterModel`, batches of 100 streamlines
resampled to 1 mm with an 'axes' neighbourhood, augmentation on) is timed two ways in this process:

- **ours**: `DWIMLAbstractTrainer.train_and_validate()` (validation, logs and a checkpoint every
  epoch included), with `num_workers` 0 and 2. Each training step is split into *data* (waiting for
  the DataLoader's next batch) and *compute* (forward, loss, backward, clipping, optimizer step),
  measured around `compute_batch_loss` and the `on_batch_end` callback;
- **baseline**: a bare loop (DataLoader, forward, loss, backward, step) on the same samplers and
  model, no validation, no logs, no checkpoints.

- **the model alone**: forward, loss, backward and optimizer step of `DirectionGetterModel` on
  the same real batches (loaded beforehand), in CPU time (`time.process_time`), beside a plain
  padded `nn.LSTM` loop of the same size (embedding + LSTM + head on `pad_sequence` tensors: the
  baseline) and the model's former packed path (`pack_padded_sequence`, with the default Adam:
  the "before" of issue #13's "≥ 5× faster"). The model runs its LSTM on `dwiml_nb.lstm_cpu`'s
  packed kernel (the CPU default), and also, for comparison, on oneDNN in padded length buckets
  (its previous default, still a GRU's path) and in one bucket. The steps are also timed on a
  skewed length distribution (many short streamlines, a few long), and with
  `torch.optim.Adam(..., fused=True)` (one kernel for all the parameters instead of a loop of
  small ops: what the trainer would need to construct).
  No batch is timed twice, and no two variants (or repeats) are timed on the same batches: oneDNN
  builds its recurrent kernels for each (length, rows) shape and caches them, so a loop over the
  same batches again would time cached kernels, which training, where each batch brings new
  shapes, mostly does not get (measured: 21.4 ms per step on repeated batches, 23.7 on fresh
  ones). Each variant first runs an untimed set (first-call costs), then each repeat times a set
  of its own; rates are per point and per streamline, the best repeat kept.

    .venv/bin/python benchmarks/bench_training.py [--epochs 3] [--quick] [--device cpu|cuda] [--json]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

for _var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

import dwiml_nb.models as models
from dwiml_nb.core import PackedStreamlines
from dwiml_nb.data import make_demo_dataset
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.models import DirectionGetterModel, compute_loss_on_batch, cosine_direction_loss
from dwiml_nb.sampler import StreamlineBatch
from dwiml_nb.please_copy_and_adapt.train_model import DirectionGetterTrainer, make_samplers

BATCH_SIZE = 100


def build(hdf5_file, max_batches=None):
    ds = MultiSubjectDataset(hdf5_file).load_data(progress=False)
    train, valid = make_samplers(ds, 'input', 'streamlines', batch_size=BATCH_SIZE, step_size=1.0,
                                 max_batches_per_epoch_training=max_batches,
                                 max_batches_per_epoch_validation=max_batches)
    torch.manual_seed(0)
    model = DirectionGetterModel(ds.nb_features['input'] * 7, hidden_size=64)
    return model, train, valid


def bare_loop(hdf5_file, epochs, num_workers, device, max_batches=None):
    model, train, _ = build(hdf5_file, max_batches)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(train.source_data, batch_sampler=train, collate_fn=train.load_batch, num_workers=num_workers)
    streamlines = points = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for batch in loader:
            # As the trainer does: a no-op when the workers interpolated (make_samplers' samplers do).
            batch = train.add_inputs(batch)
            optimizer.zero_grad()
            loss, _ = compute_loss_on_batch(model, batch, device)
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


def with_trainer(hdf5_file, epochs, num_workers, folder, device, max_batches=None):
    model, train, valid = build(hdf5_file, max_batches)
    timer = StepTimer()

    class TimedTrainer(DirectionGetterTrainer):
        def compute_batch_loss(self, data, is_training):
            if is_training:
                timer.step_start(data)
            return super().compute_batch_loss(data, is_training)

    trainer = TimedTrainer(model, folder, f'bench_w{num_workers}', train, valid, learning_rate=3e-3,
                           max_epochs=epochs, clip_grad=1.0, num_workers=num_workers, progress=False, device=device,
                           callbacks=[timer])
    start = time.perf_counter()
    history = trainer.train_and_validate()
    elapsed = time.perf_counter() - start
    nb = sum(r['nb_streamlines'] for r in history)
    return dict(streamlines_per_s=nb / elapsed, points_per_s=timer.points / elapsed, seconds=elapsed,
                data_s=timer.data_s, compute_s=timer.compute_s, other_s=elapsed - timer.data_s - timer.compute_s)


class PlainPaddedLSTM(nn.Module):
    "The textbook baseline: embedding + LSTM + head on the padded B × T × F tensor, loss on the valid steps."
    def __init__(self, nb_features, hidden_size=64):
        super().__init__()
        self.embedding = nn.Sequential(nn.Linear(nb_features, hidden_size), nn.ReLU())
        self.rnn = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 3)

    def loss(self, batch, device):
        lengths = torch.as_tensor(batch.streamlines.lengths)
        inputs = pad_sequence([x.to(device) for x in batch.inputs_per_streamline()], batch_first=True)
        points = pad_sequence(batch.streamlines_as_tensors(device), batch_first=True)
        out, _ = self.rnn(self.embedding(inputs[:, :-1]))
        valid = torch.arange(inputs.shape[1] - 1)[None, :] < (lengths - 1)[:, None]
        steps = (points[:, 1:] - points[:, :-1])[valid.to(device)]
        return cosine_direction_loss(self.head(out)[valid.to(device)], steps)


def skewed_batches(nb_batches, nb_features, seed=0):
    "Batches of 100 streamlines with lengths 2 + lognormal (median ~15 points, a few over 150), random inputs."
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(nb_batches):
        lengths = np.minimum(2 + rng.lognormal(np.log(15), 0.9, BATCH_SIZE).astype(np.int64), 300)
        steps = rng.normal(size=(int(lengths.sum()), 3)).astype(np.float32)
        points = np.cumsum(steps / np.linalg.norm(steps, axis=1, keepdims=True), 0)
        packed = PackedStreamlines.from_sequence(np.split(points, np.cumsum(lengths)[:-1]))
        inputs = torch.from_numpy(rng.random((len(points), nb_features), dtype=np.float32))
        batches.append(StreamlineBatch(packed, np.zeros(BATCH_SIZE, np.int64), np.arange(BATCH_SIZE), inputs, 0, 0))
    return batches


def model_alone(hdf5_file, nb_batches, repeats, device):
    """Rates (best of `repeats`) of forward + loss + backward + Adam step per variant, each repeat of
    each variant on `nb_batches` batches of its own (see the module's docstring): CPU time on the
    CPU (robust on a shared machine), wall-clock time (after synchronizing) on CUDA."""
    clock = time.process_time if device == 'cpu' else time.perf_counter
    _, train, _ = build(hdf5_file)

    def ours(packed=False, kernel=True, one_bucket=False, fused_adam=False):
        def loss(model, batch):
            saved = models.MIN_SAVED_CELLS
            models.MIN_SAVED_CELLS = None if one_bucket else saved
            try:
                return compute_loss_on_batch(model, batch, device)[0]
            finally:
                models.MIN_SAVED_CELLS = saved
        def make():
            model = DirectionGetterModel(nb_features, hidden_size=64)
            model._packed, model._cpu_kernel = packed, kernel
            return model
        return make, loss, dict(fused=True) if fused_adam else {}

    if device == 'cpu':
        variants = {'ours (packed LSTM kernel)': ours(), 'ours, fused Adam': ours(fused_adam=True),
                    'ours, oneDNN padded buckets': ours(kernel=False),
                    'ours, oneDNN one bucket': ours(kernel=False, one_bucket=True)}
    else:    # CUDA: the model's padded path, one bucket (cuDNN); the CPU kernel and buckets do not apply
        variants = {'ours (padded, cuDNN)': ours(), 'ours, fused Adam': ours(fused_adam=True)}
    variants |= {'former packed path': ours(packed=True, kernel=False),
                 'plain padded nn.LSTM (baseline)': (lambda: PlainPaddedLSTM(nb_features),
                                                     lambda m, b: m.loss(b, device), {})}
    nb_sets = 1 + repeats * len(variants)          # an untimed set, then one per (repeat, variant)
    demo, epoch = [], 0
    while len(demo) < nb_sets * nb_batches:        # successive epochs: other streamlines, other augmentations
        train.set_epoch(epoch)
        demo += [train.add_inputs(train.load_batch(parts)) for parts in train.epoch_plan(epoch)]
        epoch += 1
    nb_features = demo[0].inputs.shape[1]
    rows = []
    for name, batches in (('demo', demo), ('skewed', skewed_batches(nb_sets * nb_batches, nb_features))):
        sets = [batches[i * nb_batches:(i + 1) * nb_batches] for i in range(nb_sets)]

        def run(make, loss_fn, adam_options, batch_set):
            torch.manual_seed(0)
            model = make().to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, **adam_options)
            start = clock()
            for batch in batch_set:
                optimizer.zero_grad()
                loss_fn(model, batch).backward()
                optimizer.step()
            if device != 'cpu': torch.cuda.synchronize()
            return clock() - start

        for make, loss_fn, adam_options in variants.values():
            run(make, loss_fn, adam_options, sets[0])
        best = {v: (0., 0.) for v in variants}
        timed = sets[1:]
        for r in range(repeats):
            for v, (variant, spec) in enumerate(variants.items()):
                batch_set = timed[r * len(variants) + v]
                seconds = run(*spec, batch_set)
                points = sum(b.nb_points for b in batch_set)
                rate = (BATCH_SIZE * len(batch_set) / seconds, points / seconds)
                best[variant] = max(best[variant], rate, key=lambda r: r[1])   # the ratios are per point
        lengths = np.concatenate([b.streamlines.lengths for s in timed for b in s])
        for variant, (streamlines_per_s, points_per_s) in best.items():
            rows.append(dict(lengths=name, variant=variant, streamlines_per_s=streamlines_per_s,
                             points_per_s=points_per_s, length_mean=float(lengths.mean()),
                             length_max=int(lengths.max())))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--quick', action='store_true', help='tiny run (1 epoch, 3 batches): the same tables')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available on this machine')
    torch.set_num_threads(1)
    epochs, max_batches = (1, 3) if args.quick else (args.epochs, None)
    nb_batches, repeats = (2, 1) if args.quick else (8, 3)
    rows = []
    total_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        hdf5_file = make_demo_dataset(Path(d) / 'demo', which='phantom', progress=False,
                                      nb_subjects=3 if args.quick else 8).hdf5_files['phantom']
        for workers in (0, 2):
            base = bare_loop(hdf5_file, epochs, workers, args.device, max_batches)
            ours = with_trainer(hdf5_file, epochs, workers, Path(d) / 'exp', args.device, max_batches)
            rows.append(dict(num_workers=workers, ours=ours, baseline=base,
                             ratio=ours['streamlines_per_s'] / base['streamlines_per_s']))
        steps = model_alone(hdf5_file, nb_batches, repeats, args.device)
    result = dict(epochs=epochs, quick=args.quick, device=args.device, batch_size=BATCH_SIZE, torch_threads=1,
                  load_average=os.getloadavg()[0], rows=rows, model_steps=steps,
                  seconds=time.perf_counter() - total_start)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print('| workers | ours streamlines/s | ours points/s | data wait | compute | validation, logs, checkpoints '
          '| bare loop streamlines/s | ours / bare |')
    print('|---:|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        o = r['ours']
        pct = lambda x: f"{100 * x / o['seconds']:.0f}%"  # noqa: B023 (used in this iteration only)
        print(f"| {r['num_workers']} | {o['streamlines_per_s']:,.0f} | {o['points_per_s']:,.0f} | {pct(o['data_s'])} "
              f"| {pct(o['compute_s'])} | {pct(o['other_s'])} | {r['baseline']['streamlines_per_s']:,.0f} "
              f"| {r['ratio']:.2f} |")
    clock = 'CPU time' if args.device == 'cpu' else 'wall-clock time'
    print(f'\nThe model alone ({args.device}, 1 thread; forward, loss, backward, Adam step; {clock}, best of '
          f'{repeats}, each on {nb_batches} batches of {BATCH_SIZE} streamlines never timed before; ratios of '
          f'points per second):\n')
    print('| lengths | variant | streamlines/s | points/s | vs plain padded nn.LSTM | vs former packed path |')
    print('|---|---|---:|---:|---:|---:|')
    for s in steps:
        same = [b for b in steps if b['lengths'] == s['lengths']]
        base = next(b for b in same if b['variant'].startswith('plain'))
        former = next(b for b in same if b['variant'] == 'former packed path')
        label = f"{s['lengths']} (mean {s['length_mean']:.0f}, max {s['length_max']})"
        print(f"| {label} | {s['variant']} | {s['streamlines_per_s']:,.0f} | {s['points_per_s']:,.0f} "
              f"| {s['points_per_s'] / base['points_per_s']:.2f}× "
              f"| {s['points_per_s'] / former['points_per_s']:.2f}× |")


if __name__ == '__main__':
    main()
