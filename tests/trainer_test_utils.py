"""A tiny trainer, model and stand-in sampler for tests of `dwiml_nb.trainer` (importable by other tests).

`ToySampler` keeps the `dwiml_nb.contracts` protocols, BatchPlanner and BatchLoader (BatchPart with
.epoch/.batch_index/.step, set_epoch, state_dict/load_state_dict with next_batch, epoch_plan/rank_plan,
rank/world_size, get_params, load_batch with an RNG derived from (seed, epoch, batch_index),
add_inputs) on synthetic random-walk streamlines kept in RAM, so that trainer
tests do not depend on HDF5 files. `ToyTrainer` learns to predict each point's next step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dwiml_nb.core import PackedStreamlines
from dwiml_nb.trainer import DWIMLAbstractTrainer

SUBSET_SIZES = {'training': 40, 'validation': 12, 'testing': 12}


class BatchPart(tuple):
    "(subject_index, streamline_ids) carrying .epoch, .batch_index and .step, as in dwiml_nb.sampler."
    def __new__(cls, subject_index, ids, epoch, batch_index):
        part = super().__new__(cls, (subject_index, ids))
        part.epoch, part.batch_index = epoch, batch_index
        part.step = batch_index   # one process: its plan is the whole epoch's
        return part

    def __reduce__(self):   # sent to DataLoader workers
        return BatchPart, (self[0], self[1], self.epoch, self.batch_index)


@dataclass
class ToyBatch:
    "The fields of dwiml_nb.sampler.StreamlineBatch the trainer and ToyTrainer use."
    streamlines: PackedStreamlines
    subject_ids: np.ndarray
    streamline_ids: np.ndarray
    inputs: torch.Tensor
    epoch: int
    batch_index: int
    step: int

    def to(self, device):
        self.inputs = self.inputs.to(device)
        return self

    def __len__(self): return len(self.streamlines)


class ToySubset(torch.utils.data.Dataset):
    "One subject of random-walk streamlines, fully determined by the set name; `subset[i]` is `i`."
    def __init__(self, set_name='training'):
        self.set_name, self.hdf5_file, self.lazy, self.subjects = set_name, None, False, ['toy-subject']
        rng = np.random.default_rng(list(SUBSET_SIZES).index(set_name))
        lengths = rng.integers(5, 12, SUBSET_SIZES[set_name])
        self.streamlines = PackedStreamlines.from_sequence(
            [np.cumsum(rng.normal(size=(n, 3)), axis=0) + 10 for n in lengths])

    def __len__(self): return len(self.subjects)

    def __getitem__(self, i): return i


class ToySampler:
    "A stand-in batch sampler, planner and loader in one, that keeps the dwiml_nb.contracts protocols (one process)."
    rank, world_size = 0, 1

    def __init__(self, subset, *, batch_size=8, max_batches_per_epoch=None, seed=1234, noise=0.1):
        self.source_data, self.batch_size, self.seed = subset, batch_size, seed
        self.max_batches_per_epoch, self.noise = max_batches_per_epoch, noise
        self.epoch, self.next_batch = 0, 0

    def get_params(self):
        return {'batch_size': self.batch_size, 'max_batches_per_epoch': self.max_batches_per_epoch,
                'seed': self.seed, 'noise': self.noise}

    def epoch_plan(self, epoch):
        ids = np.random.default_rng([self.seed, epoch]).permutation(len(self.source_data.streamlines))
        plan = [[BatchPart(0, ids[i:i + self.batch_size].astype(np.int64), epoch, k)]
                for k, i in enumerate(range(0, len(ids), self.batch_size))]
        return plan[:self.max_batches_per_epoch]

    def rank_plan(self, epoch, rank=None): return self.epoch_plan(epoch)

    def set_epoch(self, epoch): self.epoch, self.next_batch = epoch, 0

    def __len__(self): return len(self.epoch_plan(self.epoch))

    def __iter__(self):
        plan = self.epoch_plan(self.epoch)
        for k in range(self.next_batch, len(plan)):
            self.next_batch = k + 1
            yield plan[k]

    def state_dict(self): return {'seed': self.seed, 'epoch': self.epoch, 'next_batch': self.next_batch}

    def load_state_dict(self, state):
        self.seed, self.epoch, self.next_batch = state['seed'], state['epoch'], state['next_batch']

    def load_batch(self, parts):
        (subject, ids), = parts
        rng = np.random.default_rng([self.seed, parts[0].epoch, parts[0].batch_index])
        streams = self.source_data.streamlines.select(ids)
        streams.data = (streams.data + rng.normal(scale=self.noise, size=streams.data.shape)).astype(np.float32)
        return ToyBatch(streams, np.full(len(ids), subject, np.int64), ids, torch.from_numpy(streams.data.copy()),
                        parts[0].epoch, parts[0].batch_index, parts[0].step)

    def add_inputs(self, batch): return batch   # the inputs are always made in load_batch


class ToyModel(torch.nn.Module):
    "A small MLP with dropout (so that the torch RNG matters)."
    def __init__(self, hidden=16, dropout=0.2):
        super().__init__()
        self.hidden, self.dropout = hidden, dropout
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(hidden, 3))

    def get_params(self): return {'hidden': self.hidden, 'dropout': self.dropout}

    def forward(self, x): return self.net(x)


class ToyTrainer(DWIMLAbstractTrainer):
    "Predicts each point's step to the next point. `nan_at=(epoch, batch)` makes that batch's loss NaN."
    nan_at = None

    def compute_batch_loss(self, data, is_training):
        s = data.streamlines
        last = s.offsets + s.lengths - 1
        has_next = np.ones(s.nb_points, bool)
        has_next[last] = False
        idx = torch.from_numpy(np.flatnonzero(has_next))
        x = data.inputs.to(self.device)
        loss = torch.nn.functional.mse_loss(self.model(x[idx] / 10), (x[idx + 1] - x[idx]))
        if self.nan_at == (data.epoch, data.batch_index):
            loss = loss * float('nan')
        return loss, len(data)

    @classmethod
    def rebuild_samplers(cls, samplers):
        def build(spec):
            if spec is None: return None
            return ToySampler(ToySubset(spec['source']['set_name']), **spec['params'])
        return build(samplers['training']), build(samplers['validation'])


def make_toy_trainer(experiments_path, experiment_name='exp', *, trainer_cls=ToyTrainer, model_seed=0, **kwargs):
    "A ToyTrainer on fresh ToySamplers with small defaults; kwargs go to the trainer."
    torch.manual_seed(model_seed)
    model = ToyModel()
    kwargs = {'max_epochs': 4, 'learning_rate': 0.01, 'progress': False, **kwargs}
    return trainer_cls(model, experiments_path, experiment_name, ToySampler(ToySubset('training')),
                       ToySampler(ToySubset('validation')), **kwargs)


# ---- the real thing: a tiny dwi_ml-layout HDF5 file, MultiSubjectDataset, BatchStreamlinesSamplerOneInput ----
def write_tiny_hdf5(path, *, shape=(8, 8, 8), nb_features=4, nb_streamlines=40, seed=0):
    """A dwi_ml-layout HDF5 file: subjects sub-1 (training), sub-2 (validation), sub-3 (testing),
    each with a volume group 'input' and a streamlines group 'streamlines' (voxel space, corner origin)."""
    import h5py
    rng = np.random.default_rng(seed)
    subjects = {'training': ['sub-1'], 'validation': ['sub-2'], 'testing': ['sub-3']}
    config = {'input': {'type': 'volume', 'files': ['dwi.nii.gz'], 'standardization': 'none'},
              'streamlines': {'type': 'streamlines', 'files': ['bundle.trk']}}
    str_list = h5py.string_dtype()
    with h5py.File(path, 'w') as f:
        f.attrs['data_and_time'] = '1 January 2026 00:00:00'
        all_subjects = sum(subjects.values(), [])
        f.attrs.create('chosen_subjs', np.array(all_subjects, dtype=object), dtype=str_list)
        for split, subjs in subjects.items():
            f.attrs.create(f'{split}_subjs', np.array(subjs, dtype=object), dtype=str_list)
        f.attrs['groups_config'] = repr(config)
        for key in ('step_size', 'nb_points', 'compress'):
            f.attrs[key] = 'Not defined by user'
        for subj in all_subjects:
            g = f.create_group(subj)
            vol = g.create_group('input')
            vol.attrs['type'], vol.attrs['affine'] = 'volume', np.eye(4)
            vol.attrs['voxres'], vol.attrs['nb_features'] = np.ones(3, np.float32), np.int64(nb_features)
            vol.create_dataset('data', data=rng.normal(size=(*shape, nb_features)).astype(np.float32))
            lengths = rng.integers(5, 15, nb_streamlines).astype(np.int64)
            starts = rng.uniform(2, np.array(shape) - 2, size=(nb_streamlines, 3))
            steps = rng.normal(scale=0.4, size=(int(lengths.sum()), 3))
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            steps[offsets] = starts
            points = np.clip(np.concatenate([np.cumsum(steps[o:o + n], axis=0) for o, n in zip(offsets, lengths)]),
                             0.1, np.array(shape) - 0.1)
            sl = g.create_group('streamlines')
            sl.attrs.update({'type': 'streamlines', 'space': 'Space.VOX', 'origin': 'Origin.TRACKVIS',
                             'affine': np.eye(4), 'dimensions': np.array(shape, np.int16),
                             'voxel_sizes': np.ones(3, np.float32), 'voxel_order': 'RAS'})
            sl.create_dataset('data', data=points)
            sl.create_dataset('offsets', data=offsets)
            sl.create_dataset('lengths', data=lengths)
            eucl = np.array([np.linalg.norm(np.diff(points[o:o + n], axis=0), axis=1).sum()
                             for o, n in zip(offsets, lengths)])
            sl.create_dataset('euclidean_lengths', data=eucl)
    return Path(path)


class NextStepModel(torch.nn.Module):
    "From the features under a point, predict the step to the next point (a small MLP with dropout)."
    def __init__(self, nb_features=4, hidden=16, dropout=0.2):
        super().__init__()
        self.nb_features, self.hidden, self.dropout = nb_features, hidden, dropout
        self.net = torch.nn.Sequential(torch.nn.Linear(nb_features, hidden), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 3))

    def get_params(self): return {'nb_features': self.nb_features, 'hidden': self.hidden, 'dropout': self.dropout}

    def forward(self, x): return self.net(x)


class NextStepTrainer(DWIMLAbstractTrainer):
    "The child class of the README: only compute_batch_loss (real StreamlineBatch from the real sampler)."
    def compute_batch_loss(self, data, is_training):
        s = data.streamlines
        has_next = np.ones(s.nb_points, bool)
        has_next[s.offsets + s.lengths - 1] = False
        idx = torch.from_numpy(np.flatnonzero(has_next))
        points = torch.from_numpy(np.asarray(s.data, np.float32))
        x = points / 8 if data.inputs is None else data.inputs   # without inputs: where the point is
        loss = torch.nn.functional.mse_loss(self.model(x[idx]), points[idx + 1] - points[idx])
        return loss, len(data)


def make_real_samplers(hdf5_file, *, with_inputs=True, **kwargs):
    """(training, validation) real samplers on a MultiSubjectDataset of `hdf5_file`: an
    AbstractBatchSampler (streamlines only), or BatchStreamlinesSamplerOneInput when `with_inputs`."""
    from dwiml_nb.dataset import MultiSubjectDataset
    from dwiml_nb.sampler import AbstractBatchSampler, BatchStreamlinesSamplerOneInput
    dataset = MultiSubjectDataset(hdf5_file).load_data(progress=False)
    kwargs = {'batch_size': 8, 'seed': 7, 'noise_gaussian_size': 0.1, 'reverse_ratio': 0.5, 'split_ratio': 0.2,
              **kwargs}
    make = (partial(BatchStreamlinesSamplerOneInput, input_group='input') if with_inputs else AbstractBatchSampler)
    return tuple(make(subset, 'streamlines', **kwargs) for subset in (dataset.training_set, dataset.validation_set))


def make_real_trainer(hdf5_file, experiments_path, experiment_name='exp', *, model_seed=0, with_inputs=True,
                      **kwargs):
    "A NextStepTrainer on real samplers of `hdf5_file`; kwargs go to the trainer."
    training, validation = make_real_samplers(hdf5_file, with_inputs=with_inputs)
    torch.manual_seed(model_seed)
    kwargs = {'max_epochs': 4, 'learning_rate': 0.01, 'progress': False, **kwargs}
    model = NextStepModel(nb_features=4 if with_inputs else 3)
    return NextStepTrainer(model, experiments_path, experiment_name, training, validation, **kwargs)
