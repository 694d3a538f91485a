"""Reliability against corrupted or foreign inputs: bit-flipped and truncated HDF5 files and
checkpoints, HDF5 files of other tools, and checkpoints crafted to run code when loaded.

Every file here is real (written, then damaged on disk). Sweeps over damaged files run in a
subprocess so that a crash of a C library (libhdf5, torch's zip reader) fails the test instead of
killing pytest.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import zipfile

import h5py
import numpy as np
import pytest
import torch

from dwiml_nb.core import CheckpointError, DataError
from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.hdf5 import open_dwiml_hdf5
from dwiml_nb.trainer import experiment_paths, load_checkpoint, resume_experiment, resume_main

from dwiml_nb.testing import write_dwiml_hdf5  # noqa: E402
from dwiml_nb.testing import make_toy_trainer  # noqa: E402

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# Bit flips and truncations, swept in a subprocess

SWEEP = textwrap.dedent('''
    import json, sys, traceback
    from pathlib import Path
    kind, source, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    damages = json.loads(sys.argv[4])
    from dwiml_nb.core import DwimlError
    raw = source.read_bytes()

    def hdf5_readers(path):
        # each reader on its own: one refusing first must not hide another that crashes
        from dwiml_nb.hdf5 import describe_hdf5
        from dwiml_nb.dataset import MultiSubjectDataset
        import numpy as np

        def dataset(lazy):
            ds = MultiSubjectDataset(path, lazy=lazy).load_data(progress=False)
            for subset in (ds.training_set, ds.validation_set, ds.testing_set):
                for i in range(len(subset)):
                    for g in subset.volume_groups: subset.get_volume(i, g)
                    for g in subset.streamline_groups:
                        subset.get_streamlines(i, g, np.arange(subset.nb_streamlines(i, g)))
            ds.close()
        return [lambda: describe_hdf5(path), lambda: dataset(False), lambda: dataset(True)]

    def checkpoint_readers(path):
        from dwiml_nb.trainer import load_checkpoint
        return [lambda: load_checkpoint(path.parent.parent.parent, path.parent.parent.name)]

    outcomes = []
    for how, where in damages:
        data = bytearray(raw)
        if how == 'flip': data[where] ^= 0xFF
        else: data = data[:where]
        target = work / 'exp' / 'checkpoint' / 'checkpoint.pt' if kind == 'checkpoint' else work / 'damaged.hdf5'
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(data))
        for read in (hdf5_readers if kind == 'hdf5' else checkpoint_readers)(target):
            try:
                read()
                outcomes.append('read')
            except DwimlError as e:
                outcomes.append('refused: ' + str(e))
            except BaseException as e:
                outcomes.append('CRASH ' + type(e).__name__ + ': ' + str(e)[:300] + ' @ ' + ' <- '.join(
                    f'{fr.name}:{fr.lineno}' for fr in traceback.extract_tb(e.__traceback__)[::-1][:6]))
    print(json.dumps(outcomes))
''')


def sweep(kind, source, damages, work):
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, '-c', SWEEP, kind, str(source), str(work), json.dumps(damages)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]   # a segfault or a hang of the reader fails here
    flat = json.loads(proc.stdout.strip().splitlines()[-1])
    per_damage = len(flat) // len(damages)
    return [flat[i:i + per_damage] for i in range(0, len(flat), per_damage)]   # one list of outcomes per damage


@pytest.fixture(scope='module')
def dwiml_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('h5') / 'dwiml.hdf5'
    write_dwiml_hdf5(path)
    return path


@pytest.mark.slow
def test_bit_flipped_or_truncated_hdf5_is_refused_or_read_never_crashes(dwiml_file, tmp_path):
    size = dwiml_file.stat().st_size
    rng = np.random.default_rng(0)
    # The superblock and the first object headers, then anywhere; and truncations.
    flips = sorted({*range(0, 96, 8), *rng.integers(96, 4096, 24).tolist(), *rng.integers(4096, size, 12).tolist()})
    damages = [('flip', int(p)) for p in flips] + [('cut', int(c)) for c in (8, 512, size // 4, size // 2, size - 1)]
    outcomes = sweep('hdf5', dwiml_file, damages, tmp_path)
    crashes = [(d, o) for d, per_reader in zip(damages, outcomes) for o in per_reader if o.startswith('CRASH')]
    assert crashes == []
    refused = [o for per_reader in outcomes for o in per_reader if o.startswith('refused')]
    assert all('damaged.hdf5' in o for o in refused)      # the message names the file
    # every truncation and the superblock's signature are refused by every reader, not read
    assert all(o.startswith('refused') for (how, _), per_reader in zip(damages, outcomes) if how == 'cut'
               for o in per_reader)
    assert all(o.startswith('refused') for o in outcomes[0])


@pytest.mark.slow
def test_bit_flipped_or_truncated_checkpoint_is_refused_or_read_never_crashes(tmp_path):
    make_toy_trainer(tmp_path / 'run', 'exp', max_epochs=1).train_and_validate()
    ckpt = experiment_paths(tmp_path / 'run', 'exp')['checkpoint']
    size = ckpt.stat().st_size
    with zipfile.ZipFile(ckpt) as z:   # torch's format: a zip; flip inside the pickle and the directory
        pickle_entry = next(i for i in z.infolist() if i.filename.endswith('data.pkl'))
    raw = ckpt.read_bytes()
    extra = int.from_bytes(raw[pickle_entry.header_offset + 28:pickle_entry.header_offset + 30], 'little')
    pickle_start = pickle_entry.header_offset + 30 + len(pickle_entry.filename) + extra
    rng = np.random.default_rng(1)
    flips = sorted({*range(0, 8), *rng.integers(pickle_start, pickle_start + pickle_entry.compress_size, 16).tolist(),
                    *range(size - 22, size, 3)})
    damages = [('flip', int(p)) for p in flips] + [('cut', int(c)) for c in (10, size // 2, size - 1)]
    outcomes = sweep('checkpoint', ckpt, damages, tmp_path / 'sweep')
    outcomes = [o for o, in outcomes]   # one reader
    assert [o for o in outcomes if o.startswith('CRASH')] == []
    assert all(o.startswith('refused') for (how, _), o in zip(damages, outcomes) if how == 'cut')
    assert all(o.startswith('refused') for o in outcomes[:4])   # the zip signature
    # A flip inside the pickle is refused or reads; one inside a tensor's bytes reads: torch's format
    # has no checksum it verifies (documented in docs/reliability.md).


# ---------------------------------------------------------------------------------------------
# HDF5 files written by other tools

def _keras_like(path):
    with h5py.File(path, 'w') as f:
        f.attrs['keras_version'] = '2.15.0'
        f.attrs['model_config'] = json.dumps({'class_name': 'Sequential'})
        w = f.create_group('model_weights/dense')
        w.create_dataset('kernel:0', data=np.zeros((3, 3), np.float32))


def _dwiml_like_with_foreign_values(path, **attrs):
    write_dwiml_hdf5(path)
    with h5py.File(path, 'a') as f:
        for k, v in attrs.items():
            f.attrs[k] = v


def _group_without_dataset(path):
    write_dwiml_hdf5(path)
    with h5py.File(path, 'a') as f:
        del f['sub-01/streamlines/data']


def _volume_is_3d(path):
    write_dwiml_hdf5(path)
    with h5py.File(path, 'a') as f:
        del f['sub-01/input/data']
        f['sub-01/input'].create_dataset('data', data=np.zeros((4, 4, 4), np.float32))


def _offsets_past_the_points(path):
    write_dwiml_hdf5(path)
    with h5py.File(path, 'a') as f:
        f['sub-01/streamlines/offsets'][-1] = 10 ** 6


def _zip_named_hdf5(path):
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('header.json', '{}')


@pytest.mark.parametrize('make, match', [
    (_keras_like, r"not a dwi_ml HDF5 file: root attribute\(s\) \['groups_config'"),
    (_zip_named_hdf5, 'not an HDF5 file'),
    (lambda p: _dwiml_like_with_foreign_values(p, groups_config='{"input": [1, 2'), 'groups_config attribute cannot be parsed'),
    (_group_without_dataset, "has no 'data' dataset"),
    (_volume_is_3d, 'attribute nb_features=4 but the volume has 1 features'),
    (_offsets_past_the_points, 'offsets/lengths point outside the'),
])
def test_hdf5_of_another_tool_is_refused_with_file_and_reason(tmp_path, make, match):
    path = tmp_path / 'foreign.hdf5'
    make(path)
    with pytest.raises(DataError, match=match) as e:
        MultiSubjectDataset(path).load_data(progress=False)
    assert 'foreign.hdf5' in str(e.value)


def test_groups_config_that_is_code_is_never_evaluated(tmp_path, toy_trainer):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.hdf5'
    _dwiml_like_with_foreign_values(path, groups_config=f"__import__('os').system('touch {marker}')")
    with pytest.raises(DataError, match='groups_config attribute cannot be parsed'):
        open_dwiml_hdf5(path)
    with pytest.raises(DataError, match='groups_config attribute cannot be parsed'):
        MultiSubjectDataset(path).load_data(progress=False)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints crafted to run code

class _RunsCode:
    "Unpickling this calls os.system: what a malicious checkpoint does."
    def __init__(self, marker): self.marker = str(marker)

    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


@pytest.fixture
def one_epoch(tmp_path, toy_trainer):
    toy_trainer('exp', max_epochs=1).train_and_validate()
    return tmp_path, experiment_paths(tmp_path, 'exp')['checkpoint']


@pytest.mark.parametrize('how', ['torch.save', 'plain pickle'])
def test_checkpoint_with_a_reduce_payload_is_refused_and_nothing_runs(one_epoch, capsys, how):
    path, ckpt_file = one_epoch
    marker = path / 'pwned'
    ckpt = torch.load(ckpt_file, weights_only=True)
    ckpt['history'] = _RunsCode(marker)
    if how == 'torch.save':
        torch.save(ckpt, ckpt_file)
    else:
        ckpt_file.write_bytes(pickle.dumps(ckpt, protocol=2))
    with pytest.raises(CheckpointError, match='cannot be read') as e:
        load_checkpoint(path, 'exp')
    assert 'checkpoint.pt' in str(e.value)
    with pytest.raises(SystemExit) as exit_:
        resume_main([str(path), 'exp', '--no_progress'])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and 'Traceback' not in err and 'checkpoint.pt' in err
    assert not marker.exists()


@pytest.mark.parametrize('field, value', [('model_class', 'subprocess:Popen'),
                                          ('trainer_class', 'subprocess:Popen')])
def test_checkpoint_naming_a_callable_that_runs_code_is_refused_and_nothing_runs(one_epoch, field, value):
    path, ckpt_file = one_epoch
    marker = path / 'pwned'
    ckpt = torch.load(ckpt_file, weights_only=True)   # plain strings and dicts: weights_only lets them through
    ckpt[field] = value
    ckpt['model_params'] = {'args': ['touch', str(marker)]}
    torch.save(ckpt, ckpt_file)
    try:
        with pytest.raises(CheckpointError, match='is not a'):
            resume_experiment(path, 'exp')
    finally:
        time.sleep(0.2)   # a Popen that did start has time to leave its marker
    assert not marker.exists()
