"""Training throughput with torch.distributed: N processes (torchrun, DDP) vs 1 process.

The README's example model (`DirectionGetterModel`, demo phantom, batches of 100 streamlines at
1 mm with an 'axes' neighbourhood, augmentation on) trains for a fixed number of epochs under
`torchrun --nproc_per_node 1` (the baseline, measured by this same script right before) and
`--nproc_per_node N`. Throughput = training streamlines of all ranks per second of the training
loop (logs/batches.csv, rank 0's clock). On CPU each process gets OMP_NUM_THREADS=1, so the
comparison is "1 core vs N cores"; on a machine with GPUs use `--device cuda` (one GPU per
process).

    .venv/bin/python benchmarks/bench_distributed.py [--nproc 2] [--epochs 2] [--device cpu] [--quick] [--json]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_SIZE = 100


def worker(hdf5, exp, device, epochs, max_batches=None):
    "What runs in every process under torchrun."
    import torch
    from dwiml_nb.dataset import MultiSubjectDataset
    from dwiml_nb.models import DirectionGetterModel
    from dwiml_nb.please_copy_and_adapt.train_model import DirectionGetterTrainer, make_samplers
    torch.set_num_threads(1)
    ds = MultiSubjectDataset(hdf5).load_data(progress=False)
    train, _ = make_samplers(ds, 'input', 'streamlines', batch_size=BATCH_SIZE, step_size=1.0,
                             max_batches_per_epoch_training=max_batches)
    torch.manual_seed(0)
    model = DirectionGetterModel(ds.nb_features['input'] * 7, hidden_size=64)
    trainer = DirectionGetterTrainer(model, exp, 'bench', train, None, max_epochs=epochs, device=device,
                                     progress=False, overwrite=True)
    trainer.train_and_validate()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(nproc, hdf5, workdir, device, epochs, max_batches=0):
    import pandas as pd
    exp = Path(workdir) / f'exp{nproc}'
    torchrun = Path(sys.executable).parent / 'torchrun'
    cmd = [str(torchrun), '--nproc_per_node', str(nproc), '--master_addr', '127.0.0.1', '--master_port',
           str(free_port()), __file__, '--worker', str(hdf5), str(exp), device, str(epochs),
           str(max_batches)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    wall = time.perf_counter() - start
    batches = pd.read_csv(exp / 'bench' / 'logs' / 'batches.csv').query("phase == 'train'")
    seconds = float(batches.time_s.sum())
    return {'nproc': nproc, 'steps': len(batches), 'streamlines': int(batches.nb_streamlines.sum()),
            'train_seconds': seconds, 'streamlines_per_s': batches.nb_streamlines.sum() / seconds,
            'wall_seconds_with_startup': wall}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == '--worker':
        hdf5, exp, device, epochs, max_batches = sys.argv[2:7]
        return worker(hdf5, exp, device, int(epochs), int(max_batches) or None)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--nproc', type=int, default=2)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (one GPU per process)")
    p.add_argument('--json', action='store_true')
    p.add_argument('--quick', action='store_true', help='1 epoch of 4 batches (smoke test, same code path)')
    args = p.parse_args()
    max_batches = 0        # 0: all the batches of an epoch
    if args.quick:
        args.epochs, max_batches = 1, 4
    from dwiml_nb.data import make_demo_dataset
    with tempfile.TemporaryDirectory() as tmp:
        hdf5 = make_demo_dataset(Path(tmp) / 'demo', which='phantom', progress=False).hdf5_files['phantom']
        single = run(1, hdf5, tmp, args.device, args.epochs, max_batches)
        multi = run(args.nproc, hdf5, tmp, args.device, args.epochs, max_batches)
    result = {'device': args.device, 'cpu_count': os.cpu_count(), 'single': single, 'multi': multi,
              'speedup': multi['streamlines_per_s'] / single['streamlines_per_s']}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.device}, {os.cpu_count()} cores, {args.epochs} epoch(s), batches of {BATCH_SIZE} streamlines "
              f"per process; throughput = training streamlines of all ranks per second of the training loop.\n")
        print('| processes | steps | streamlines/s | wall s (with start-up) | vs 1 process |')
        print('|---:|---:|---:|---:|---:|')
        for r in (single, multi):
            print(f"| {r['nproc']} | {r['steps']} | {r['streamlines_per_s']:.0f} | {r['wall_seconds_with_startup']:.1f} "
                  f"| {r['streamlines_per_s'] / single['streamlines_per_s']:.2f}× |")


if __name__ == '__main__':
    main()
