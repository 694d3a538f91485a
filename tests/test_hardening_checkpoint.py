"""Checkpoint content that loads safely but is wrong: refused in one line, before anything is written."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dwiml_nb.core import CheckpointError
from dwiml_nb.trainer import checkpoint_digest, experiment_paths, load_checkpoint

from dwiml_nb.testing import ToyModel, ToySampler, ToySubset, ToyTrainer, make_toy_trainer  # noqa: E402

BIN = Path(sys.executable).parent


def _wrong_optimizer_shape(ckpt):
    state = ckpt['optimizer_state']['state']
    first = next(iter(state))
    state[first]['exp_avg'] = torch.zeros(7, 3)


def _set(key, value):
    def edit(ckpt): ckpt[key] = value
    return edit


def _set_in(key, sub, value):
    def edit(ckpt): ckpt[key][sub] = value
    return edit


EDITS = [
    ('optimizer state shape', _wrong_optimizer_shape, r"optimizer state 'exp_avg' has shape \(7, 3\) for a parameter"),
    ('negative epoch', _set_in('position', 'epoch', -2), 'position.epoch is not an integer >= 0: -2'),
    ('negative batches_done', _set_in('position', 'batches_done', -1), 'position.batches_done is not an integer >= 0'),
    ('negative log size', _set_in('log_sizes', 'batches_csv', -100), 'log_sizes.batches_csv is not an integer >= 0: -100'),
    ('float log size', _set_in('log_sizes', 'epochs_csv', 1.5), 'log_sizes.epochs_csv is not an integer >= 0: 1.5'),
    ('unknown trainer parameter', _set_in('trainer_params', 'rm_rf', True),
     r'unknown trainer parameter\(s\) rm_rf \(not accepted by ToyTrainer\)'),
    ('history not a list', _set('history', {'a': 1}), 'history is not a list of per-epoch records'),
    ('history of strings', _set('history', ['x']), 'history is not a list of per-epoch records'),
    ('history too short', _set('history', []), 'history has 0 epoch.s. but the position is epoch 1'),
    ('nan best loss', _set('best_valid_loss', math.nan), 'best_valid_loss is not a number: nan'),
    ('string best loss', _set('best_valid_loss', 'low'), "best_valid_loss is not a number: 'low'"),
    ('negative patience count', _set('patience_count', -1), 'patience_count is not an integer >= 0'),
    ('trainer params not a dict', _set('trainer_params', [1, 2]), 'trainer_params is not a dict'),
    ('no history', lambda c: c.pop('history'), "it has no 'history'"),
]


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp('exps')
    make_toy_trainer(path, 'exp', max_epochs=1).train_and_validate()
    return experiment_paths(path, 'exp')


def _copy_experiment(pristine, tmp_path):
    import shutil
    shutil.copytree(pristine['root'], tmp_path / 'exp')
    return experiment_paths(tmp_path, 'exp')


def _save_with_digest(ckpt, path):
    "Save an edited checkpoint with the checksum of its new content: what the content checks must catch."
    ckpt['content_sha256'] = checkpoint_digest(ckpt)
    torch.save(ckpt, path)


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}


@pytest.mark.parametrize('name, edit, message', EDITS, ids=[e[0] for e in EDITS])
def test_wrong_checkpoint_content_is_refused_before_anything_is_written(tmp_path, pristine, name, edit, message):
    paths = _copy_experiment(pristine, tmp_path)
    ckpt = torch.load(paths['checkpoint'], weights_only=True)
    edit(ckpt)
    _save_with_digest(ckpt, paths['checkpoint'])
    before = _snapshot(paths['root'])
    with pytest.raises(CheckpointError, match=message) as err:
        trainer = ToyTrainer.init_from_checkpoint(ToyModel(), tmp_path, 'exp', ToySampler(ToySubset('training')),
                                                  ToySampler(ToySubset('validation')), new_max_epochs=2,
                                                  progress=False)
        trainer.train_and_validate()
    assert f"file '{paths['checkpoint']}'" in str(err.value) and '\n' not in str(err.value)
    assert _snapshot(paths['root']) == before


def test_the_pristine_checkpoint_passes(pristine):
    assert load_checkpoint(pristine['root'].parent, 'exp')['position'] == {'epoch': 1, 'batches_done': 0}


@pytest.mark.slow
@pytest.mark.parametrize('name, edit, message', [EDITS[1], EDITS[9]], ids=[EDITS[1][0], EDITS[9][0]])
def test_resume_script_says_it_in_one_line(tmp_path, pristine, name, edit, message):
    paths = _copy_experiment(pristine, tmp_path)
    ckpt = torch.load(paths['checkpoint'], weights_only=True)
    edit(ckpt)
    _save_with_digest(ckpt, paths['checkpoint'])
    before = _snapshot(paths['root'])
    run = subprocess.run([BIN / 'dwiml_resume_training_from_checkpoint', tmp_path, 'exp', '--import',
                          'dwiml_nb.testing', '--no_progress'], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and 'Traceback' not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: file '{paths['checkpoint']}': "), run.stderr
    assert 'the checkpoint is damaged or was edited' in lines[0]
    assert _snapshot(paths['root']) == before


def _tensor_bytes_offset(path):
    "Offset and size, in the file, of the largest tensor's raw bytes (an uncompressed entry of torch's zip)."
    import zipfile
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    raw = Path(path).read_bytes()
    extra = int.from_bytes(raw[entry.header_offset + 28:entry.header_offset + 30], 'little')
    return entry.header_offset + 30 + len(entry.filename) + extra, entry.file_size


@pytest.mark.slow
def test_a_flipped_bit_in_a_tensor_is_refused_by_the_checksum(tmp_path, pristine):
    paths = _copy_experiment(pristine, tmp_path)
    start, size = _tensor_bytes_offset(paths['checkpoint'])
    raw = bytearray(paths['checkpoint'].read_bytes())
    raw[start + size // 2] ^= 0x10
    paths['checkpoint'].write_bytes(bytes(raw))
    torch.load(paths['checkpoint'], weights_only=True)   # torch reads it without a word
    before = _snapshot(paths['root'])
    with pytest.raises(CheckpointError, match='checksum mismatch: the file was altered or damaged') as err:
        ToyTrainer.init_from_checkpoint(ToyModel(), tmp_path, 'exp', ToySampler(ToySubset('training')),
                                        ToySampler(ToySubset('validation')), new_max_epochs=2, progress=False)
    assert f"file '{paths['checkpoint']}'" in str(err.value)
    assert _snapshot(paths['root']) == before
    run = subprocess.run([BIN / 'dwiml_resume_training_from_checkpoint', tmp_path, 'exp', '--import',
                          'dwiml_nb.testing', '--no_progress', '--new_max_epochs', '2'], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and 'Traceback' not in run.stderr and 'checksum mismatch' in run.stderr


def test_a_checkpoint_without_checksum_loads_with_a_warning(tmp_path, pristine, caplog):
    paths = _copy_experiment(pristine, tmp_path)
    ckpt = torch.load(paths['checkpoint'], weights_only=True)
    assert len(ckpt.pop('content_sha256')) == 64
    torch.save(ckpt, paths['checkpoint'])
    with caplog.at_level('WARNING', logger='dwiml_nb'):
        trainer = ToyTrainer.init_from_checkpoint(ToyModel(), tmp_path, 'exp', ToySampler(ToySubset('training')),
                                                  ToySampler(ToySubset('validation')), new_max_epochs=2,
                                                  progress=False)
    assert 'has no checksum (written by an older dwiml_nb)' in caplog.text
    assert len(trainer.train_and_validate()) == 2
    assert load_checkpoint(tmp_path, 'exp')['content_sha256'] == checkpoint_digest(load_checkpoint(tmp_path, 'exp'))


# ---- random states of the GPUs (#13.8) ----------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


def test_checkpoint_rng_states_have_the_cuda_states_exactly_when_cuda_is_initialized(tmp_path, toy_trainer):
    toy_trainer('exp', max_epochs=1).train_and_validate()
    ckpt = load_checkpoint(tmp_path, 'exp')
    for states in (ckpt['rng_states'], *ckpt['rng_states_per_rank']):
        assert {'torch', 'numpy', 'python'} <= set(states)
        assert ('cuda' in states) == torch.cuda.is_initialized()
        if 'cuda' in states:
            assert len(states['cuda']) == torch.cuda.device_count()
            assert all(s.dtype == torch.uint8 for s in states['cuda'])


def test_rng_states_without_cuda_states_restore_the_rest(tmp_path):
    from dwiml_nb.checkpoint import get_rng_states, set_rng_states
    states = get_rng_states()
    states.pop('cuda', None)   # a checkpoint written without CUDA, or by an older version
    a = torch.rand(3)
    set_rng_states(states)
    assert torch.equal(a, torch.rand(3))


def test_cuda_states_resumed_without_cuda_restore_the_rest_and_warn(monkeypatch, caplog):
    from dwiml_nb.checkpoint import get_rng_states, set_rng_states
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    states = {**get_rng_states(), 'cuda': [torch.zeros(16, dtype=torch.uint8)] * 2}
    a = torch.rand(3)
    with caplog.at_level('WARNING', logger='dwiml_nb'):
        set_rng_states(states)
    assert torch.equal(a, torch.rand(3))
    assert 'holds the random states of 2 GPU(s) but CUDA is not available here' in caplog.text


@pytest.mark.cuda
@needs_cuda
def test_mid_epoch_resume_on_the_gpu_is_exact_with_dropout(tmp_path, toy_trainer):
    """Dropout on the GPU draws from the CUDA generator: only its state in the checkpoint makes a
    resume from the middle of an epoch give bitwise the weights of an uninterrupted run."""
    run = dict(max_epochs=2, checkpoint_every_n_batches=2, device='cuda')
    straight = toy_trainer('straight', **run)
    straight.train_and_validate()

    class Crash:
        def on_batch_end(self, trainer, record):
            if (record['epoch'], record['batch']) == (1, 2): raise RuntimeError('crash after a checkpoint')

    with pytest.raises(RuntimeError, match='crash after a checkpoint'):
        toy_trainer('crashed', callbacks=[Crash()], **run).train_and_validate()
    assert load_checkpoint(tmp_path, 'crashed')['position'] == {'epoch': 1, 'batches_done': 2}
    assert 'cuda' in load_checkpoint(tmp_path, 'crashed')['rng_states']
    torch.cuda.manual_seed_all(4321)   # the GPU's generator moved on: the checkpoint must put it back
    resumed = ToyTrainer.init_from_checkpoint(ToyModel(), tmp_path, 'crashed', ToySampler(ToySubset('training')),
                                              ToySampler(ToySubset('validation')), progress=False)
    resumed.train_and_validate()
    for key, value in straight.unwrapped_model.state_dict().items():
        assert torch.equal(value, resumed.unwrapped_model.state_dict()[key]), key
