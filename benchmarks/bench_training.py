"""Trainer overhead: DWIMLAbstractTrainer vs a bare training loop on the same real batches.

Both run in this process on the same tiny HDF5 file (tests/trainer_test_utils.write_tiny_hdf5,
scaled up), same model, same samplers, num_workers=0; we report streamlines/s and the ratio
trainer / bare loop (logging, checkpoints and bookkeeping are the difference).

    .venv/bin/python benchmarks/bench_training.py [--epochs 3] [--nb_streamlines 2000]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from trainer_test_utils import NextStepModel, make_real_samplers, make_real_trainer, write_tiny_hdf5  # noqa: E402


def bare_loop(hdf5_file, epochs):
    training, _ = make_real_samplers(hdf5_file)
    torch.manual_seed(0)
    model = NextStepModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    from trainer_test_utils import NextStepTrainer
    loss_of = NextStepTrainer.compute_batch_loss
    holder = type('Holder', (), {'model': model})()
    n = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        training.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(training.source_data, batch_sampler=training,
                                             collate_fn=training.load_batch)
        for data in loader:
            optimizer.zero_grad()
            loss, _ = loss_of(holder, data, True)
            loss.backward()
            optimizer.step()
            n += len(data)
    return n / (time.perf_counter() - start)


def with_trainer(hdf5_file, epochs, folder):
    trainer = make_real_trainer(hdf5_file, folder, 'bench', max_epochs=epochs, progress=False)
    start = time.perf_counter()
    history = trainer.train_and_validate()
    elapsed = time.perf_counter() - start
    return sum(r['nb_streamlines'] for r in history) / elapsed   # validation time counted as overhead


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--nb_streamlines', type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        hdf5_file = write_tiny_hdf5(Path(d) / 'bench.hdf5', nb_streamlines=args.nb_streamlines)
        bare = bare_loop(hdf5_file, args.epochs)
        ours = with_trainer(hdf5_file, args.epochs, Path(d) / 'exps')
    print(f'bare loop: {bare:,.0f} streamlines/s; DWIMLAbstractTrainer: {ours:,.0f} streamlines/s; '
          f'ratio {ours / bare:.2f} (validation and checkpoints included on our side)')


if __name__ == '__main__':
    main()
