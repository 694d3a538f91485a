"""dwiml_nb.trackers: TensorBoard and Comet trackers on real training runs, lazy imports, clear errors."""
import json
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dwiml_nb.core import ConfigError
from dwiml_nb.trackers import CometTracker, TensorBoardTracker, make_tracker

from dwiml_nb.testing import (ToyModel, ToySampler, ToySubset, ToyTrainer, make_real_trainer,  # noqa: E402
                                make_toy_trainer, write_tiny_hdf5)

torch.set_num_threads(1)
REPO = Path(__file__).parent.parent
BATCH_TAGS = ('loss', 'grad_norm', 'grad_norm_clipped', 'learning_rate', 'streamlines_per_s')
EPOCH_TAGS = ('train_loss', 'valid_loss', 'grad_norm', 'grad_norm_clipped', 'learning_rate', 'nb_streamlines',
              'best_valid_loss', 'best_epoch', 'patience_count', 'time_s', 'streamlines_per_s')


def read_tensorboard(log_dir):
    "({tag: [(step, value)]}, {text tag: text}) from the event files of `log_dir`."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir), size_guidance={'scalars': 0, 'tensors': 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()['tensors']}
    return scalars, texts


def read_logs(root):
    return (pd.read_csv(root / 'logs' / 'batches.csv').query("phase == 'train'").reset_index(drop=True),
            pd.read_csv(root / 'logs' / 'epochs.csv'))


def assert_scalars_match_logs(scalars, batches, epochs):
    "Every batch and epoch metric of the CSV logs is in TensorBoard, at the right step, with its value (float32)."
    for col in BATCH_TAGS:
        steps, values = zip(*scalars[f'train/{col}'])
        assert list(steps) == list(range(len(batches))), col
        np.testing.assert_allclose(values, batches[col].to_numpy(np.float32), rtol=1e-6, err_msg=col)
    for col in EPOCH_TAGS:
        steps, values = zip(*scalars[f'epoch/{col}'])
        assert list(steps) == epochs.epoch.tolist(), col
        np.testing.assert_allclose(values, epochs[col].to_numpy(np.float32), rtol=1e-6, err_msg=col)


@pytest.fixture(scope='module')
def hdf5_file(tmp_path_factory):
    return write_tiny_hdf5(tmp_path_factory.mktemp('data') / 'tiny.hdf5')


def test_tensorboard_holds_the_csv_logs_of_a_real_run(tmp_path, hdf5_file):
    trainer = make_real_trainer(hdf5_file, tmp_path, 'exp', max_epochs=2, clip_grad=0.05,
                                callbacks=[TensorBoardTracker()])
    trainer.train_and_validate()
    scalars, texts = read_tensorboard(tmp_path / 'exp' / 'tensorboard')
    batches, epochs = read_logs(tmp_path / 'exp')
    assert len(epochs) == 2 and len(batches) > 2
    assert_scalars_match_logs(scalars, batches, epochs)
    assert (batches.grad_norm_clipped < batches.grad_norm).any()   # the two norms are told apart
    params = json.loads(texts['parameters_json/text_summary'].strip('`\n'))
    assert params['trainer'] == json.loads(json.dumps(trainer.get_params()))
    assert params['model'] == {'nb_features': 4, 'hidden': 16, 'dropout': 0.2}
    assert params['experiment_name'] == 'exp' and params['trainer_class'] == 'NextStepTrainer'
    assert params['sampler_training']['batch_size'] == 8
    assert '| trainer/clip_grad | 0.05 |' in texts['parameters/text_summary']


class StopAfter:
    "A callback that kills the run (an exception) after the training batch `batch` of `epoch`."
    def __init__(self, epoch, batch): self.at = (epoch, batch)

    def on_batch_end(self, trainer, record):
        if (record['epoch'], record['batch']) == self.at: raise KeyboardInterrupt('killed')


def test_resume_continues_the_steps_and_purges_batches_logged_after_the_checkpoint(tmp_path):
    tracker = TensorBoardTracker()
    trainer = make_toy_trainer(tmp_path, 'exp', max_epochs=2, checkpoint_every_n_batches=2,
                               callbacks=[tracker, StopAfter(1, 2)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_validate()
    tracker.close()   # what the end of the killed process does
    before, _ = read_tensorboard(tmp_path / 'exp' / 'tensorboard')
    n_epoch0 = len(pd.read_csv(tmp_path / 'exp/logs/batches.csv').query("phase == 'train' and epoch == 0"))
    # epoch 1: batches 0, 1 before the checkpoint, batch 2 after it (to be redone by the resume)
    assert [s for s, _ in before['train/loss']] == list(range(n_epoch0 + 3))

    resumed = ToyTrainer.init_from_checkpoint(ToyModel(), tmp_path, 'exp', ToySampler(ToySubset('training')),
                                              ToySampler(ToySubset('validation')), progress=False,
                                              callbacks=[TensorBoardTracker()])
    resumed.train_and_validate()
    after, _ = read_tensorboard(tmp_path / 'exp' / 'tensorboard')
    batches, epochs = read_logs(tmp_path / 'exp')
    assert len(epochs) == 2
    assert_scalars_match_logs(after, batches, epochs)   # each step once, with the resumed run's value


def test_comet_offline_archive_holds_params_and_metrics_and_touches_no_network(tmp_path, hdf5_file, monkeypatch):
    connections = []
    real_connect = socket.socket.connect

    def record_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6): connections.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, 'connect', record_connect)
    monkeypatch.delenv('COMET_API_KEY', raising=False)
    offline = tmp_path / 'comet'
    trainer = make_real_trainer(hdf5_file, tmp_path, 'exp', max_epochs=2,
                                callbacks=[CometTracker(project_name='dwiml-test', offline_directory=offline)])
    trainer.train_and_validate()
    assert connections == []
    archive, = offline.glob('*.zip')
    with zipfile.ZipFile(archive) as z:
        experiment = json.loads(z.read('experiment.json'))
        messages = [json.loads(line) for line in z.read('messages.json').splitlines()]
    assert experiment['project_name'] == 'dwiml-test'
    params = {m['payload']['param']['paramName']: m['payload']['param']['paramValue']
              for m in messages if m['type'] == 'parameter_msg' and m['payload']['param']['source'] == 'manual'}
    assert params['trainer/learning_rate'] == 0.01 and params['model/hidden'] == 16
    assert params['experiment_name'] == 'exp'
    metrics = {}
    for m in messages:
        if m['type'] == 'metric_msg':
            metric = m['payload']['metric']
            metrics.setdefault(metric['metricName'], []).append((metric['step'], metric['epoch'], metric['metricValue']))
    batches, epochs = read_logs(tmp_path / 'exp')
    for col in BATCH_TAGS:   # comet keeps float64: exactly the CSV's values
        assert metrics[f'train/{col}'] == list(zip(range(len(batches)), batches.epoch, batches[col])), col
    for col in ('train_loss', 'valid_loss', 'best_valid_loss', 'learning_rate'):
        assert metrics[f'epoch/{col}'] == list(zip(epochs.epoch, epochs.epoch, epochs[col])), col
    names = [m['payload'] for m in messages if m['type'] == 'log_other']
    assert {'key': 'Name', 'value': 'exp'} in [{k: p.get(k) for k in ('key', 'value')} for p in names]


def run_python(code):
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.mark.slow
def test_importing_the_module_imports_no_tracker_package():
    result = run_python("""
        import sys
        import dwiml_nb.trackers
        loaded = [m for m in ('tensorboard', 'torch.utils.tensorboard', 'comet_ml') if m in sys.modules]
        assert not loaded, loaded
        dwiml_nb.trackers.make_tracker('tensorboard', log_dir='unused')
        assert 'tensorboard' in sys.modules and 'comet_ml' not in sys.modules
        dwiml_nb.trackers.make_tracker('comet', offline_directory='unused')
        from comet_ml.error_tracking.api import enabled_in_config
        assert not enabled_in_config()   # comet's own error reports would go over the network
    """)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize('name, package', [('tensorboard', 'tensorboard'), ('comet', 'comet_ml')])
def test_a_missing_package_gives_a_config_error_naming_what_to_install(name, package):
    result = run_python(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path, target=None):
                if fullname.split('.')[0] == {package!r}: raise ModuleNotFoundError(f"No module named '{{fullname}}'")
        sys.meta_path.insert(0, Block())
        from dwiml_nb.core import ConfigError
        from dwiml_nb.trackers import make_tracker
        try:
            make_tracker({name!r}, **({{'log_dir': 'unused'}} if {name!r} == 'tensorboard' else {{}}))
        except ConfigError as e:
            print(e)
        else:
            sys.exit('no error')
    """)
    assert result.returncode == 0, result.stderr
    assert f"needs the '{package}' package" in result.stdout
    assert f'pip install {package}' in result.stdout


def test_unknown_tracker_and_tracker_without_folder_are_refused():
    with pytest.raises(ConfigError, match="unknown tracker 'wandb': choose one of tensorboard, comet"):
        make_tracker('wandb')
    with pytest.raises(ConfigError, match='without log_dir'):
        TensorBoardTracker().log_metrics({'a': 1.0}, step=0)


@pytest.mark.slow
def test_only_rank_0_logs_in_a_distributed_run(tmp_path):
    script = textwrap.dedent("""
        import sys, types
        from pathlib import Path
        import torch, torch.distributed as dist
        from dwiml_nb.trackers import TensorBoardTracker
        rank, root = int(sys.argv[1]), Path(sys.argv[2])
        dist.init_process_group('gloo', init_method=f'file://{root}/store', rank=rank, world_size=2)
        trainer = types.SimpleNamespace(paths={'root': root / f'rank{rank}', 'batches_csv': root / 'none.csv'},
                                        experiment_name='exp', model=torch.nn.Linear(1, 1), get_params=dict)
        tracker = TensorBoardTracker()
        tracker.on_train_begin(trainer)
        tracker.on_batch_end(trainer, {'epoch': 0, 'batch': 0, 'phase': 'train', 'loss': 1.0})
        tracker.on_epoch_end(trainer, {'epoch': 0, 'train_loss': 1.0})
        tracker.on_train_end(trainer)
        dist.barrier()
        dist.destroy_process_group()
    """)
    procs = [subprocess.Popen([sys.executable, '-c', script, str(rank), str(tmp_path)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    scalars, _ = read_tensorboard(tmp_path / 'rank0' / 'tensorboard')
    assert scalars == {'train/loss': [(0, 1.0)], 'epoch/train_loss': [(0, 1.0)]}
    assert not (tmp_path / 'rank1').exists()
