"""What the trainer does with the process around it: torch threads, elapsed time across resumes,
callbacks told when training stops on an error, text progress and log lines in Jupyter."""
import contextlib
import io
import sys

import pandas as pd
import pytest
import torch

import dwiml_nb.core
from dwiml_nb.core import ConfigError, progress_bar, setup_logging
from dwiml_nb.trainer import choose_torch_threads, default_torch_threads, experiment_paths

from dwiml_nb.testing import ToyModel, ToySampler, ToySubset, ToyTrainer, make_toy_trainer  # noqa: E402


class ThreadsSeen:
    "Records torch's thread count at every batch."
    def __init__(self): self.seen = []
    def on_batch_end(self, trainer, record): self.seen.append(torch.get_num_threads())


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_trainer_uses_the_threads_asked_for_then_restores_them(tmp_path, threads_restored, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    torch.set_num_threads(2)
    seen = ThreadsSeen()
    make_toy_trainer(tmp_path, 'exp', max_epochs=1, num_threads=1, callbacks=[seen]).train_and_validate()
    assert seen.seen and set(seen.seen) == {1}
    assert torch.get_num_threads() == 2


def test_trainer_chooses_threads_from_cores_and_workers(tmp_path, threads_restored, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr('dwiml_nb.trainer.usable_cores', lambda: 6)
    seen = ThreadsSeen()
    make_toy_trainer(tmp_path, 'exp', max_epochs=1, callbacks=[seen]).train_and_validate()
    assert set(seen.seen) == {default_torch_threads(0, cores=6)} == {3}


def test_omp_num_threads_set_by_the_user_is_left_alone(tmp_path, threads_restored, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    torch.set_num_threads(2)
    seen = ThreadsSeen()
    make_toy_trainer(tmp_path, 'exp', max_epochs=1, callbacks=[seen]).train_and_validate()
    assert set(seen.seen) == {2}
    assert choose_torch_threads(None)[1] == 'OMP_NUM_THREADS'


def test_a_bad_thread_count_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match='num_threads must be at least 1'):
        make_toy_trainer(tmp_path, 'exp', max_epochs=1, num_threads=0)


def test_elapsed_time_grows_and_carries_over_a_resume(tmp_path):
    make_toy_trainer(tmp_path, 'exp', max_epochs=2).train_and_validate()
    paths = experiment_paths(tmp_path, 'exp')
    first = pd.read_csv(paths['batches_csv'])
    assert first.elapsed_s.is_monotonic_increasing and (first.elapsed_s > 0).all()
    torch.manual_seed(0)
    ToyTrainer.init_from_checkpoint(ToyModel(), tmp_path, 'exp', ToySampler(ToySubset('training')),
                                    ToySampler(ToySubset('validation')), new_max_epochs=3,
                                    progress=False).train_and_validate()
    batches, epochs = pd.read_csv(paths['batches_csv']), pd.read_csv(paths['epochs_csv'])
    assert batches.elapsed_s.is_monotonic_increasing and len(batches) > len(first)
    assert batches.elapsed_s.iloc[len(first)] > first.elapsed_s.iloc[-1]
    assert epochs.elapsed_s.is_monotonic_increasing and len(epochs) == 3


class EndSeen:
    def __init__(self): self.ended = 0
    def on_train_end(self, trainer): self.ended += 1


class FailingTrainer(ToyTrainer):
    def compute_batch_loss(self, data, is_training):
        if self.batches_done == 1: raise KeyboardInterrupt
        return super().compute_batch_loss(data, is_training)


def test_callbacks_hear_the_end_of_training_also_when_it_stops_on_an_error(tmp_path):
    end = EndSeen()
    trainer = make_toy_trainer(tmp_path, 'exp', trainer_cls=FailingTrainer, max_epochs=2, callbacks=[end])
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_validate()
    assert end.ended == 1


def test_in_a_jupyter_kernel_progress_and_log_lines_go_to_stdout(monkeypatch):
    # stderr shows as red blocks in Jupyter: an epoch line must not look like an error.
    monkeypatch.setattr(dwiml_nb.core, 'in_jupyter_kernel', lambda: True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for _ in progress_bar(range(3), desc='epoch 0 training'):
            pass
        assert dwiml_nb.core._message_stream() is sys.stdout
    assert 'epoch 0 training' in out.getvalue() and not err.getvalue()


def test_progress_bars_are_text_not_widgets():
    from tqdm.std import tqdm
    bar = progress_bar(total=2, file=io.StringIO())
    assert type(bar) is tqdm
    bar.close()
    assert callable(setup_logging)
