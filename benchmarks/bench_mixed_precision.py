"""Step time of the example model with and without mixed precision (bf16 autocast; fp16 on CUDA).

`DirectionGetterModel` on real demo-phantom batches (loaded beforehand, the same batches for
every run): forward under `torch.autocast`, loss, backward, clipping and optimizer step, as the
trainer's step runs them. On the CPU the time is CPU time (`time.process_time`, the machine is
shared); on CUDA, wall time after `torch.cuda.synchronize()`. fp32 is the baseline, measured in
the same process, runs interleaved.

    .venv/bin/python benchmarks/bench_mixed_precision.py [--quick] [--device cpu|cuda] [--json]
"""
import argparse
import contextlib
import json
import os
import tempfile
import time

for _var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import torch

from dwiml_nb.data import make_demo_dataset
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.models import DirectionGetterModel, compute_loss_on_batch
from dwiml_nb.please_copy_and_adapt.train_model import make_samplers
from dwiml_nb.trainer import PRECISIONS


def demo_batches(folder, nb_batches, batch_size):
    demo = make_demo_dataset(folder, which='phantom', nb_subjects=3, progress=False)
    ds = MultiSubjectDataset(demo.hdf5_files['phantom']).load_data(progress=False)
    train, _ = make_samplers(ds, 'input', 'streamlines', batch_size=batch_size, step_size=1.0)
    plan = train.epoch_plan(0)
    return [train.load_batch(plan[i % len(plan)]) for i in range(nb_batches)], ds.nb_features['input'] * 7


def step_times(batches, nb_inputs, precision, device, repeats):
    "Seconds per training step (median over `repeats` passes over the batches)."
    torch.manual_seed(0)
    model = DirectionGetterModel(nb_inputs, hidden_size=64).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cuda') if precision == 'fp16' else None
    dtype = PRECISIONS[precision]
    autocast = (lambda: contextlib.nullcontext()) if dtype is None else (lambda: torch.autocast(device, dtype=dtype))
    clock = time.process_time if device == 'cpu' else time.perf_counter
    passes = []
    for r in range(repeats + 1):   # the first pass warms up
        if device == 'cuda': torch.cuda.synchronize()
        start = clock()
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss, _ = compute_loss_on_batch(model, batch, device)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is not None: scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if scaler is None: optimizer.step()
            else: scaler.step(optimizer); scaler.update()
        if device == 'cuda': torch.cuda.synchronize()
        if r: passes.append((clock() - start) / len(batches))
    return sorted(passes)[len(passes) // 2], float(loss)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='few small batches (< 30 s): the same table')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--json', action='store_true', help='print JSON instead of a markdown table')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    nb_batches, batch_size, repeats = (3, 20, 3) if args.quick else (10, 100, 5)
    precisions = ['fp32', 'bf16'] + (['fp16'] if args.device == 'cuda' else [])
    with tempfile.TemporaryDirectory(prefix='dwiml_bench_amp_') as d:
        batches, nb_inputs = demo_batches(d, nb_batches, batch_size)
    rows = {p: step_times(batches, nb_inputs, p, args.device, repeats) for p in precisions}
    base = rows['fp32'][0]
    results = [{'precision': p, 'step_ms': t * 1e3, 'vs_fp32': t / base, 'last_loss': loss}
               for p, (t, loss) in rows.items()]
    if args.json:
        print(json.dumps({'device': args.device, 'batch_size': batch_size, 'results': results}, indent=2))
        return
    clock = 'CPU time' if args.device == 'cpu' else 'wall time'
    print(f'Training step of DirectionGetterModel, {batch_size} streamlines per batch, {args.device} ({clock}):\n')
    print('| precision | ms per step | × fp32 | last loss |\n|---|---:|---:|---:|')
    for r in results:
        print(f"| {r['precision']} | {r['step_ms']:.1f} | {r['vs_fp32']:.2f} | {r['last_loss']:.4f} |")


if __name__ == '__main__':
    main()
