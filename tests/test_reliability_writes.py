"""Reliability of writes: real processes killed (SIGKILL) in the middle of a write, and real full disks.

Each kill is deterministic without touching the library: the driver process installs a Python
audit hook (`sys.addaudithook`) that SIGKILLs the process itself when the library opens a given
input file (the HDF5 builder, in the middle of a subject) or renames a checkpoint's temporary file
onto `checkpoint.pt` (the trainer, between "written" and "published"). A full disk is a real
tmpfs of a few hundred kB (skipped when mounting is not permitted), or a real file size limit
(RLIMIT_FSIZE) in a subprocess.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from dwiml_nb.core import DataError, DiskFullError
from dwiml_nb.hdf5 import create_hdf5_dataset, describe_hdf5, open_dwiml_hdf5
from dwiml_nb.trainer import TIMING_COLUMNS, experiment_paths, load_checkpoint

from dwiml_nb.testing import make_database, write_subject_lists  # noqa: E402
from dwiml_nb.testing import ToyModel, ToySampler, ToySubset, ToyTrainer, make_toy_trainer  # noqa: E402

# Bitwise comparisons need the same reduction order in every process.
torch.set_num_threads(1)
SPLIT = (['sub-01', 'sub-02'], ['sub-03'], [])
# Clipping, a scheduler and mid-epoch checkpoints (every 2 batches) in every trainer run here.
RUN = dict(clip_grad=0.5, lr_scheduler={'name': 'StepLR', 'step_size': 1, 'gamma': 0.7}, optimizer='AdamW',
           weight_decay=0.01, checkpoint_every_n_batches=2)


def resume(path, name, **kwargs):
    torch.manual_seed(99)   # another init: the checkpoint's weights must win
    return ToyTrainer.init_from_checkpoint(ToyModel(), path, name, ToySampler(ToySubset('training')),
                                           ToySampler(ToySubset('validation')), progress=False, **kwargs)


def assert_same_experiment(a, b):
    "Two experiment folders hold bitwise the same weights, optimizer state and loss history."
    pa, pb = experiment_paths(*a), experiment_paths(*b)
    for key in ('best_model', 'last_model'):
        sa, sb = torch.load(pa[key], weights_only=True), torch.load(pb[key], weights_only=True)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), key
    ca, cb = load_checkpoint(*a), load_checkpoint(*b)
    assert ca['position'] == cb['position']
    assert [(r['epoch'], r['train_loss'], r['valid_loss']) for r in ca['history']] == \
           [(r['epoch'], r['train_loss'], r['valid_loss']) for r in cb['history']]
    for k, state in ca['optimizer_state']['state'].items():
        for name, v in state.items():
            assert torch.equal(v, cb['optimizer_state']['state'][k][name])
    for key in ('batches_csv', 'epochs_csv'):   # same rows, timing columns aside
        da, db = pd.read_csv(pa[key]), pd.read_csv(pb[key])
        pd.testing.assert_frame_equal(da.drop(columns=list(TIMING_COLUMNS)), db.drop(columns=list(TIMING_COLUMNS)),
                                      check_exact=True)


def hidden_temps(directory, name):
    "The temporary files `atomic_write` leaves next to `name` when its writer is killed."
    return sorted(Path(directory).glob(f'.{name}.tmp-*'))


def same_hdf5_content(a, b):
    "Every dataset and attribute of two HDF5 files is equal (the build date aside)."
    with h5py.File(a, 'r') as fa, h5py.File(b, 'r') as fb:
        assert {k: v for k, v in fa.attrs.items() if k != 'data_and_time'}.keys() == \
               {k: v for k, v in fb.attrs.items() if k != 'data_and_time'}.keys()
        names_a, names_b = [], []
        fa.visit(names_a.append); fb.visit(names_b.append)
        assert names_a == names_b
        for name in names_a:
            if isinstance(fa[name], h5py.Dataset):
                np.testing.assert_array_equal(fa[name][()], fb[name][()])


# ---------------------------------------------------------------------------------------------
# SIGKILL of dwiml_create_hdf5_dataset in the middle of a subject

BUILD_KILLER = textwrap.dedent('''
    import os, signal, sys
    kill_at = sys.argv[1]

    def hook(event, args):
        # the builder opens this input file of the subject: the subject is half written
        if event == 'open' and isinstance(args[0], (str, os.PathLike)) and os.fspath(args[0]).endswith(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    from dwiml_nb.hdf5 import create_hdf5_main
    create_hdf5_main(sys.argv[2:])
''')


@pytest.fixture(scope='module')
def build_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp('build')
    db = make_database(root / 'db', ('sub-01', 'sub-02', 'sub-03'))
    config = root / 'config.json'
    config.write_text(json.dumps(db['config']))
    lists = write_subject_lists(root / 'lists', *SPLIT)
    reference = root / 'reference.hdf5'
    create_hdf5_dataset(db['root'], reference, config, *lists, progress=False)
    return db, config, lists, reference


def killed_build(build_inputs, out, *extra):
    db, config, lists, _ = build_inputs
    args = [str(db['root']), str(out), str(config), *map(str, lists), '--no_progress', *extra]
    proc = subprocess.run([sys.executable, '-c', BUILD_KILLER, 'sub-02/anat/t1.nii.gz', *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return args


@pytest.mark.slow
def test_build_killed_mid_subject_leaves_no_file_and_the_next_run_rebuilds(build_inputs, tmp_path):
    out = tmp_path / 'out' / 'dataset.hdf5'
    args = killed_build(build_inputs, out)
    # Nothing where a reader looks; the half-written file is hidden under a temporary name.
    assert not out.exists()
    stale = hidden_temps(out.parent, out.name)
    assert len(stale) == 1 and stale[0].stat().st_size > 0
    with pytest.raises(DataError, match='does not exist'):
        open_dwiml_hdf5(out)
    # The next run (a real process) builds the whole file and removes the dead writer's temp file.
    proc = subprocess.run([str(Path(sys.executable).parent / 'dwiml_create_hdf5_dataset'), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ['dataset.hdf5']
    same_hdf5_content(out, build_inputs[3])


@pytest.mark.slow
def test_overwrite_killed_mid_subject_keeps_the_previous_file(build_inputs, tmp_path):
    out = tmp_path / 'dataset.hdf5'
    previous = build_inputs[3].read_bytes()
    out.write_bytes(previous)
    killed_build(build_inputs, out, '--overwrite')
    assert out.read_bytes() == previous
    describe_hdf5(out)  # still a good, readable file


# ---------------------------------------------------------------------------------------------
# SIGKILL of the trainer in the middle of a checkpoint write

TRAIN_KILLER = textwrap.dedent('''
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from dwiml_nb.testing import make_toy_trainer
    RUN = {run!r}
    event_wanted, nth = {event!r}, {nth}
    seen, opens = [], {{}}

    def hook(event, args):
        if event == 'os.rename' and event_wanted == 'before_rename':
            path = os.fspath(args[1])
            if not path.endswith('/checkpoint/checkpoint.pt'): return
        elif event == 'open' and event_wanted == 'before_fsync' and isinstance(args[0], (str, os.PathLike)):
            # mkstemp opens the temp file (the event comes before it exists), torch writes it, then
            # atomic_write opens it again to fsync it: the second open is "written, not yet durable".
            path = os.fspath(args[0])
            if '/checkpoint/.checkpoint.pt.tmp-' not in path: return
            opens[path] = opens.get(path, 0) + 1
            if opens[path] != 2: return
        else:
            return
        seen.append(path)
        if len(seen) == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    make_toy_trainer({path!r}, 'exp', max_epochs=3, **RUN).train_and_validate()
''')


@pytest.fixture(scope='module')
def straight_toy_run(tmp_path_factory):
    path = tmp_path_factory.mktemp('straight')
    make_toy_trainer(path, 'exp', max_epochs=3, **RUN).train_and_validate()
    return path


# With 5 batches an epoch and a checkpoint every 2 batches, the checkpoints are written at
# (epoch, batches_done) = (0, 2), (0, 4), (1, 0), (1, 2), ...: the 4th write is killed, the 3rd stands.
@pytest.mark.slow
@pytest.mark.parametrize('moment', ['before_fsync', 'before_rename'])
def test_trainer_killed_mid_checkpoint_write_keeps_the_previous_one_and_resumes_exactly(
        tmp_path, straight_toy_run, moment):
    script = TRAIN_KILLER.format(event=moment, nth=4, path=str(tmp_path), run=RUN)
    with open(tmp_path / 'output.txt', 'w') as out:
        proc = subprocess.run([sys.executable, '-c', script], stdout=out, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / 'output.txt').read_text()
    ckpt_file = experiment_paths(tmp_path, 'exp')['checkpoint']
    assert len(hidden_temps(ckpt_file.parent, 'checkpoint.pt')) == 1   # the killed write, hidden
    assert load_checkpoint(tmp_path, 'exp')['position'] == {'epoch': 1, 'batches_done': 0}
    trainer = resume(tmp_path, 'exp', new_max_epochs=3)
    trainer.train_and_validate()
    assert hidden_temps(ckpt_file.parent, 'checkpoint.pt') == []        # cleaned by the next write
    assert_same_experiment((tmp_path, 'exp'), (straight_toy_run, 'exp'))


# ---------------------------------------------------------------------------------------------
# Full disks: a real tmpfs, and a real file size limit

@pytest.fixture
def small_disk(tmp_path):
    "A real 512 kB tmpfs; skipped when this process may not mount one (needs root)."
    disk = tmp_path / 'disk'
    disk.mkdir()
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=512k', 'tmpfs', str(disk)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here (needs root): {proc.stderr.strip()}')
    try:
        yield disk
    finally:
        subprocess.run(['umount', '-l', str(disk)], check=False)


def fill(disk, leave_bytes):
    "Write a ballast file until only about `leave_bytes` stay free on `disk`; return it."
    ballast = disk / 'ballast'
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(ballast, 'wb') as f:
        f.write(b'\0' * max(free - leave_bytes, 0))
    return ballast


def test_full_disk_during_a_checkpoint_is_a_clear_error_and_the_last_one_stays(small_disk, straight_toy_run):
    class FillDiskAfterFirstEpoch:
        # Leaves room for a few log rows but not for the next 24 kB checkpoint.
        def on_epoch_end(self, trainer, record):
            if record['epoch'] == 0:
                fill(small_disk, leave_bytes=8192)

    trainer = make_toy_trainer(small_disk, 'exp', max_epochs=3, callbacks=[FillDiskAfterFirstEpoch()], **RUN)
    with pytest.raises(DiskFullError, match=r"checkpoint\.pt': cannot be written: no space left on device"):
        trainer.train_and_validate()
    ckpt_file = experiment_paths(small_disk, 'exp')['checkpoint']
    assert hidden_temps(ckpt_file.parent, 'checkpoint.pt') == []
    assert load_checkpoint(small_disk, 'exp')['position'] == {'epoch': 1, 'batches_done': 0}
    # Room made, the run goes on from the last good checkpoint to the very same result.
    (small_disk / 'ballast').unlink()
    resume(small_disk, 'exp', new_max_epochs=3).train_and_validate()
    assert_same_experiment((small_disk, 'exp'), (straight_toy_run, 'exp'))


def test_no_room_while_logging_a_batch_is_a_clear_error(tmp_path):
    # A file size limit just above the batch log's size: the next row (before any other write) fails.
    class LimitFileSizeAfterFirstEpoch:
        def on_epoch_end(self, trainer, record):
            if record['epoch'] == 0:
                size = trainer.paths['batches_csv'].stat().st_size
                resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a kill
    trainer = make_toy_trainer(tmp_path, 'exp', max_epochs=3, callbacks=[LimitFileSizeAfterFirstEpoch()],
                               checkpoint_every_n_batches=100)
    try:
        with pytest.raises(DiskFullError, match=r"batches\.csv': cannot be written: file too large"):
            trainer.train_and_validate()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert load_checkpoint(tmp_path, 'exp')['position'] == {'epoch': 1, 'batches_done': 0}


def test_full_disk_during_a_build_exits_2_with_one_line_and_keeps_the_previous_file(build_inputs, small_disk):
    db, config, lists, reference = build_inputs
    out = small_disk / 'dataset.hdf5'
    out.write_bytes(b'previous build')
    fill(small_disk, leave_bytes=reference.stat().st_size // 2)
    proc = subprocess.run([str(Path(sys.executable).parent / 'dwiml_create_hdf5_dataset'), str(db['root']),
                           str(out), str(config), *map(str, lists), '--no_progress', '--overwrite'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert 'Traceback' not in proc.stderr
    assert f"file '{out}': cannot be written: no space left on device" in proc.stderr
    assert out.read_bytes() == b'previous build'
    assert sorted(p.name for p in small_disk.iterdir()) == ['ballast', 'dataset.hdf5']


FSIZE_LIMITED = textwrap.dedent('''
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from dwiml_nb.hdf5 import create_hdf5_main
    create_hdf5_main(sys.argv[2:])
''')


def test_file_size_limit_during_a_build_exits_2_with_one_line(build_inputs, tmp_path):
    db, config, lists, reference = build_inputs
    out = tmp_path / 'dataset.hdf5'
    proc = subprocess.run([sys.executable, '-c', FSIZE_LIMITED, str(reference.stat().st_size // 2), str(db['root']),
                           str(out), str(config), *map(str, lists), '--no_progress'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert 'Traceback' not in proc.stderr and 'cannot be written: file too large' in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
