"""DataLoader workers write a batch's inputs into reused shared-memory buffers (`interpolation.SharedBuffers`).

Real HDF5 files, real DataLoader worker processes (fork and spawn). What must hold: the batches
are bitwise those of 0 workers; a batch (or a view of its inputs) the main process keeps is never
overwritten by a later batch; buffers are reused once released; when every buffer is busy the
worker falls back to fresh ones; inputs a collate function sends outside their batch (torch then
shares the buffer itself) are never overwritten either; the main process keeps the buffers it
received mapped (their next loans come by key alone) and lets them go once their workers end.
"""
from __future__ import annotations

import copy
import functools
import gc
import multiprocessing
from dataclasses import replace
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dwiml_nb.dataset import MultiSubjectDataset
from dwiml_nb.interpolation import MAPPED_BUFFERS, SHARED_BUFFERS, SharedBuffers
from dwiml_nb.sampler import SHARED_POINTS, BatchStreamlinesSamplerOneInput
from dwiml_nb.testing import write_dwiml_hdf5
from dwiml_nb.trainer import _completed_batches

AUGMENT = dict(split_ratio=0.3, reverse_ratio=0.5, noise_gaussian_size=0.3)
START_METHODS = [m for m in ('fork', 'spawn') if m in multiprocessing.get_all_start_methods()]


@pytest.fixture(scope='module')
def training_set(tmp_path_factory):
    path = tmp_path_factory.mktemp('shared') / 'data.hdf5'
    write_dwiml_hdf5(path, training=('sub-03', 'sub-01', 'sub-05'), dims=(9, 10, 8), nb_streamlines=(40, 25, 60, 3, 12))
    return MultiSubjectDataset(path).load_data(progress=False).training_set


def make_sampler(subset, **kw):
    kw = {'batch_size': 150, 'batch_size_units': 'nb_points', 'step_size': 0.8, 'nb_subjects_per_batch': 2,
          'seed': 7, 'neighborhood_type': 'axes', 'neighborhood_radius': 1, **AUGMENT, **kw}
    return BatchStreamlinesSamplerOneInput(subset, 'streamlines', 'input', **kw)


def reference_batches(subset, epochs):
    "The batches of 0 workers (the main process alone: private buffers, no pickling), by (epoch, batch_index)."
    sampler = make_sampler(subset)
    batches = {}
    for epoch in epochs:
        sampler.set_epoch(epoch)
        batches.update({(parts[0].epoch, parts[0].batch_index): sampler.load_batch(parts) for parts in sampler})
    return batches


def assert_same_batch(got, want):
    assert (got.epoch, got.batch_index) == (want.epoch, want.batch_index)
    np.testing.assert_array_equal(got.streamlines.data, want.streamlines.data)
    np.testing.assert_array_equal(got.subject_ids, want.subject_ids)
    assert got.inputs.dtype == want.inputs.dtype and got.inputs.shape == want.inputs.shape
    assert torch.equal(got.inputs, want.inputs)             # bitwise: same kernel, same rows


# Module-level, so that spawned workers can unpickle them.
def load_with_stats(sampler, parts):
    "The worker's batch, and its pools' counts after making it (with the worker's id; 'points': the points' pool)."
    batch = sampler.load_batch(parts)
    return batch, {**SHARED_BUFFERS.stats, 'points': dict(SHARED_POINTS.stats), 'worker': torch.utils.data.get_worker_info().id}


def small_pool(max_buffers, worker_id):
    SHARED_BUFFERS.max_buffers = max_buffers


def loader_for(sampler, start_method, max_buffers=None, **kw):
    return DataLoader(sampler.source_data, batch_sampler=sampler, collate_fn=functools.partial(load_with_stats, sampler),
                      num_workers=2, persistent_workers=True, prefetch_factor=4, multiprocessing_context=start_method,
                      worker_init_fn=None if max_buffers is None else functools.partial(small_pool, max_buffers), **kw)


@pytest.mark.parametrize('start_method', START_METHODS)
def test_same_batches_as_0_workers_and_buffers_reused(training_set, start_method):
    want = reference_batches(training_set, (0, 1, 2))
    assert len({epoch for epoch, _ in want}) == 3
    sampler = make_sampler(training_set)
    loader = loader_for(sampler, start_method)
    by_key = MAPPED_BUFFERS.stats['by_key']
    got, last = [], {}
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        for batch, worker_stats in loader:
            assert_same_batch(batch, want[batch.epoch, batch.batch_index])
            # Received as a loan: a storage of its own (not the worker's shared one) ...
            assert not batch.inputs.is_shared()
            # ... and so are the points: right after the inputs in the same loan (one handle for both).
            assert not batch.streamlines.data.flags.owndata   # pickled by value, numpy would own a copy
            assert batch.streamlines.data.ctypes.data == batch.inputs.data_ptr() + 4 * batch.inputs.numel()
            got.append((batch.epoch, batch.batch_index))
            last[worker_stats['worker']] = worker_stats
            del batch                                          # ... that frees the buffer when dropped
    assert got == list(want) and len(got) > 3 * 2
    # Lent again, a buffer came by its key alone: this process kept it mapped ...
    assert MAPPED_BUFFERS.stats['by_key'] > by_key
    # ... until its worker ended.
    del loader
    gc.collect()
    MAPPED_BUFFERS.let_go_of_ended()
    assert len(MAPPED_BUFFERS) == 0
    # Batches dropped as they come: each worker allocates a few buffers, then reuses them.
    stats = list(last.values())
    assert sum(s['reused'] for s in stats) > sum(s['created'] for s in stats)
    assert all(s['fallbacks'] == 0 for s in stats)
    # The points, a few hundred KB a batch, ride in the inputs' buffer: their own pool is unused.
    assert all(s['points'] == dict(created=0, reused=0, fallbacks=0, lent=0, retired=0) for s in stats)


@pytest.mark.parametrize('start_method', START_METHODS)
def test_each_epochs_workers_lend_by_key_and_are_let_go_when_they_end(training_set, start_method):
    # As the trainer runs its loaders: new workers every epoch, their buffers unmapped here once done.
    want = reference_batches(training_set, (0, 1))
    sampler = make_sampler(training_set)
    MAPPED_BUFFERS.let_go_of_ended()
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        before = dict(MAPPED_BUFFERS.stats)
        loader = DataLoader(sampler.source_data, batch_sampler=sampler, collate_fn=sampler.load_batch,
                            num_workers=2, persistent_workers=False, multiprocessing_context=start_method)
        nb = 0
        for batch in _completed_batches(loader, sampler):
            assert_same_batch(batch, want[batch.epoch, batch.batch_index])
            nb += 1
            del batch
        assert nb == sum(1 for key in want if key[0] == epoch) and nb > 4
        assert MAPPED_BUFFERS.stats['kept'] > before['kept']          # this epoch's workers' buffers ...
        assert MAPPED_BUFFERS.stats['by_key'] > before['by_key']      # ... lent again by key ...
        assert len(MAPPED_BUFFERS) == 0                                # ... and let go with their workers


@pytest.mark.parametrize('start_method', START_METHODS)
def test_points_alone_are_lent_from_their_own_pool(training_set, start_method):
    "Inputs left to the main process (``inputs_in_workers=False``): the points still travel as a loan."
    want = reference_batches(training_set, (0, 1))
    sampler = make_sampler(training_set, inputs_in_workers=False)
    loader = loader_for(sampler, start_method)
    last, nb_batches = {}, 0
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for batch, worker_stats in loader:
            assert batch.inputs is None
            # Every batch's points arrived as a loan (a view of the received tensor; pickled by
            # value, numpy would own a copy). Checked here, batch by batch: the pools' counts are a
            # snapshot taken when the batch was made, and its queue's feeder thread sends it later.
            assert isinstance(batch.streamlines.data.base, torch.Tensor) and not batch.streamlines.data.flags.owndata
            assert_same_batch(sampler.add_inputs(batch), want[batch.epoch, batch.batch_index])
            last[worker_stats['worker']] = worker_stats
            nb_batches += 1
            del batch
    assert nb_batches == len(want)
    stats = [s['points'] for s in last.values()]
    assert sum(s['reused'] for s in stats) > sum(s['created'] for s in stats)   # released buffers reused
    assert all(s['fallbacks'] == 0 for s in stats)
    assert all(s['lent'] == 0 for s in last.values())          # the inputs' pool lends nothing


def test_workers_reuse_released_buffers_and_fall_back_when_all_are_busy(training_set):
    want = reference_batches(training_set, (0, 1))
    sampler = make_sampler(training_set)
    loader = loader_for(sampler, START_METHODS[0], max_buffers=2)
    kept, views, view_values, counts = [], [], [], []
    # Epoch 0: every batch kept (every buffer busy: fallbacks), checked, then released. Epoch 1: a
    # view of some batches' inputs kept, or a batch whose inputs were moved to shared memory (as
    # when sent on to a third process), the others dropped.
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for i, (batch, worker_stats) in enumerate(loader):
            counts.append(worker_stats)
            if epoch == 0:
                kept.append(batch)
            elif i % 3 == 0:
                views += [batch.inputs[1:5].numpy(), batch.streamlines.data[2:6]]
                view_values += [v.copy() for v in views[-2:]]
            elif i % 3 == 1:
                batch.inputs.share_memory_()                   # the loan is copied out, the buffer freed
                kept.append(batch)
            del batch
        if epoch == 0:
            assert sum(c['fallbacks'] for c in counts) > 0
            for batch in kept:
                assert_same_batch(batch, want[batch.epoch, batch.batch_index])
            kept, batch = [], None
            gc.collect()
    for batch in kept:
        assert_same_batch(batch, want[batch.epoch, batch.batch_index])
    for view, value in zip(views, view_values):
        np.testing.assert_array_equal(view, value)
    assert max(c['created'] for c in counts) <= 2 + 1          # per worker: max_buffers (+1 replaced larger)
    assert sum(c['reused'] for c in counts) > 0


def test_kept_batches_stay_intact_with_spawn(training_set):
    if 'spawn' not in START_METHODS:
        pytest.skip('no spawn start method here')
    want = reference_batches(training_set, (0, 1))
    sampler = make_sampler(training_set)
    loader = loader_for(sampler, 'spawn', max_buffers=1)
    kept = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for i, (batch, _) in enumerate(loader):
            if i % 2 == 0:
                kept.append(batch)
            del batch
    for batch in kept:
        assert_same_batch(batch, want[batch.epoch, batch.batch_index])


def test_a_loan_in_one_process():
    pool = SharedBuffers(max_buffers=1)
    sent = pool.empty((300, 5))
    sent.copy_(torch.arange(1500.).reshape(300, 5))
    data = ForkingPickler.dumps(pool.lend(sent))
    assert len(data) < 1000                                   # a handle, not 6 kB of floats
    buffer = pool._buffers[0]
    del sent
    assert buffer.state() == 'busy'                           # lent and not received
    received = ForkingPickler.loads(data)
    assert torch.equal(received, torch.arange(1500.).reshape(300, 5))
    column = received[:, 2]
    kept = copy.deepcopy(received[:2])
    del received
    gc.collect()
    assert buffer.state() == 'busy'                           # a view lives
    del column
    gc.collect()
    assert buffer.state() == 'free'
    assert torch.equal(kept, torch.arange(10.).reshape(2, 5))
    other = pool.empty((300, 5))
    assert other.untyped_storage().data_ptr() == buffer.storage.data_ptr()
    assert pool.empty((1, 5)).untyped_storage().data_ptr() != buffer.storage.data_ptr()   # busy: a fresh one
    assert pool.stats == dict(created=1, reused=1, fallbacks=1, lent=1, retired=0)


# Module-level, for the workers.
def inputs_outside_their_batch(sampler, parts):
    "A collate function that sends the inputs beside the batch, not in it: torch shares their buffer itself."
    batch = sampler.load_batch(parts)
    return batch.inputs, replace(batch, inputs=None), dict(SHARED_BUFFERS.stats)


def test_inputs_sent_outside_their_batch_are_never_overwritten(training_set):
    want = reference_batches(training_set, (0, 1))
    sampler = make_sampler(training_set)
    loader = DataLoader(sampler.source_data, batch_sampler=sampler, num_workers=2, persistent_workers=True,
                        collate_fn=functools.partial(inputs_outside_their_batch, sampler))
    kept, stats = [], []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for inputs, batch, worker_stats in loader:
            assert inputs.is_shared()                      # the worker's buffer itself, mapped here
            kept.append((inputs, batch))
            stats.append(worker_stats)
    # Every one kept maps a buffer the worker handed out and never got back: none was reused.
    assert len({inputs.untyped_storage().data_ptr() for inputs, _ in kept}) == len(kept)
    for inputs, batch in kept:
        assert torch.equal(inputs, want[batch.epoch, batch.batch_index].inputs)
    assert sum(s['retired'] for s in stats) > 0 and all(s['reused'] == 0 and s['lent'] == 0 for s in stats)
