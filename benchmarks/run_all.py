"""Run every benchmark and put their tables in benchmarks/results/ and in the README.

    .venv/bin/python benchmarks/run_all.py                 # all benchmarks (~5 minutes on 2 cores)
    .venv/bin/python benchmarks/run_all.py loader training # some of them
    .venv/bin/python benchmarks/run_all.py --quick         # every script in its quick mode (a smoke run:
                                                           # results go to a temporary folder, not the README)

Each benchmark's markdown output goes to ``benchmarks/results/<name>.md``; the README's block
between ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` is rebuilt from all the
result files present. Run it on a quiet machine: the figures are wall-clock and CPU times.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / 'README.md'
RESULTS = HERE / 'results'
# name -> (script, title); the README shows them in this order.
BENCHMARKS = {
    'interpolation': ('bench_interpolation.py', 'Interpolation alone (45 features, 1M streamline-like points)'),
    'loader': ('bench_loader.py', 'The full `load_batch` (read + resample + augment + interpolate)'),
    'dataset': ('bench_dataset.py', 'Lazy vs RAM datasets: memory and streamline reads'),
    'training': ('bench_training.py', 'Training the example model on the demo phantom'),
    'mixed_precision': ('bench_mixed_precision.py', 'Mixed precision: bfloat16 autocast vs float32 (training step, CPU)'),
    'tracking': ('bench_tracking.py', 'Tracking: seeds per second'),
    'builder': ('bench_builder.py', 'Building an HDF5 file: peak memory'),
    'threads': ('bench_threads.py', "torch's default thread count vs the trainer's choice"),
    'distributed': ('bench_distributed.py', '2 processes vs 1 (torch.distributed, gloo, CPU)'),
    'memory': ('bench_memory.py', 'Memory over a long run (leak check)'),
}
START, END = '<!-- benchmarks:start -->', '<!-- benchmarks:end -->'


def run(name, results=RESULTS, quick=False):
    script, _ = BENCHMARKS[name]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(HERE / script)] + (['--quick'] if quick else []),
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f'{script} failed')
    results.mkdir(exist_ok=True)
    (results / f'{name}.md').write_text(out.stdout.strip() + '\n')
    print(f'{name}: {time.perf_counter() - start:.0f} s', file=sys.stderr)


def update_readme():
    parts = [START]
    for name, (script, title) in BENCHMARKS.items():
        md = RESULTS / f'{name}.md'
        if md.exists():
            parts += [f'### {title}', f'`benchmarks/{script}`', '', md.read_text().strip(), '']
    parts.append(END)
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f'README.md has no {START} ... {END} block')
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(head + '\n'.join(parts) + tail)


def main(argv):
    quick = '--quick' in argv
    names = [a for a in argv if a != '--quick']
    os.environ.setdefault('PYTHONWARNINGS', 'ignore')
    unlisted = sorted(p.name for p in HERE.glob('bench_*.py') if p.name not in {s for s, _ in BENCHMARKS.values()})
    if unlisted:  # a benchmark that run_all does not know would never reach the README
        raise SystemExit(f'benchmarks missing from run_all.BENCHMARKS: {", ".join(unlisted)}')
    for name in names:
        if name not in BENCHMARKS:
            raise SystemExit(f'unknown benchmark {name!r}; known: {", ".join(BENCHMARKS)}')
    names = names or list(BENCHMARKS)
    if quick:
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                run(name, Path(tmp), quick=True)
        return
    for name in names:
        run(name)
    update_readme()


if __name__ == '__main__':
    main(sys.argv[1:])
