"""Trilinear interpolation with neighborhoods, against scipy's map_coordinates and obvious loops.

Both paths (the numba kernel and the torch gather, run on CPU here) must give scipy's
``map_coordinates(order=1, mode='nearest')`` at ``coords - 0.5`` within 1e-5.
"""
from __future__ import annotations

import itertools
import threading

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import map_coordinates
from torch.utils.data import DataLoader, Dataset

from dwiml_nb.core import ConfigError, DataError
from dwiml_nb.interpolation import (_interpolate_numba, interpolate_with_neighborhood, neighborhood_offsets,
                                    trilinear_interpolation)

from dwiml_nb.testing import write_dwiml_hdf5  # noqa: E402

BACKENDS = ['numba', 'torch']
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


def scipy_interpolation(volume, coords):
    "The reference: scipy at voxel-centre coordinates (coords - 0.5), edges replicated."
    volume = np.asarray(volume, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    if len(coords) == 0:
        return np.zeros((0, volume.shape[3]))
    return np.stack([map_coordinates(volume[..., f], (coords - 0.5).T, order=1, mode='nearest')
                     for f in range(volume.shape[3])], axis=1)


def border_points(shape, rng, n_random=300):
    "Points on, near and beyond every border and corner, plus random ones inside and around."
    size = np.asarray(shape[:3], dtype=np.float64)
    per_axis = [np.array([-3.0, -1e-6, 0.0, 1e-6, 0.25, 0.5, 0.5 + 1e-6, 1.0, s / 2, s - 0.5 - 1e-6,
                          s - 0.5, s - 0.5 + 1e-6, s - 1e-6, s, s + 1e-6, s + 7.0]) for s in size]
    corners = np.array(list(itertools.product(*per_axis)))
    random = rng.uniform(-1.0, size + 1.0, (n_random, 3))
    return np.concatenate([corners, random])


def random_walks(rng, shape, nb_streamlines, nb_points, step=0.3):
    starts = rng.uniform(0, 1, (nb_streamlines, 1, 3)) * np.asarray(shape[:3])
    return (starts + np.cumsum(rng.normal(scale=step, size=(nb_streamlines, nb_points, 3)), axis=1)).reshape(-1, 3)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('shape', [(7, 5, 6, 4), (1, 4, 3, 2), (2, 1, 1, 3), (4, 5, 3, 45), (3, 3, 3, 1)])
def test_matches_scipy_on_and_beyond_borders(backend, shape):
    rng = np.random.default_rng(sum(shape))
    volume = rng.normal(size=shape).astype(np.float32)
    coords = border_points(shape, rng)
    got = trilinear_interpolation(torch.from_numpy(volume), torch.from_numpy(coords), backend=backend)
    assert got.dtype == torch.float32 and got.shape == (len(coords), shape[3])
    np.testing.assert_allclose(got.numpy(), scipy_interpolation(volume, coords), atol=1e-5, rtol=0)


@pytest.mark.parametrize('backend', BACKENDS)
def test_float32_coords_give_the_same_as_float64(backend):
    rng = np.random.default_rng(1)
    volume = torch.from_numpy(rng.random((12, 11, 10, 5), dtype=np.float32))
    coords32 = torch.from_numpy(rng.uniform(-1, 13, (1000, 3)).astype(np.float32))
    got = trilinear_interpolation(volume, coords32, backend=backend)
    np.testing.assert_allclose(got.numpy(), scipy_interpolation(volume.numpy(), coords32.numpy()), atol=1e-5)


def test_a_voxel_centre_gives_that_voxel_exactly():
    rng = np.random.default_rng(2)
    volume = rng.normal(size=(5, 6, 7, 3)).astype(np.float32)
    idx = np.array(list(itertools.product(range(5), range(6), range(7))))
    got = trilinear_interpolation(torch.from_numpy(volume), idx + 0.5)
    np.testing.assert_array_equal(got.numpy(), volume[tuple(idx.T)])


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(1, 20)),
       seed=st.integers(0, 2**32 - 1), scale=st.floats(0.1, 3.0))
def test_numba_and_torch_agree_with_scipy_for_any_shape(shape, seed, scale):
    rng = np.random.default_rng(seed)
    volume = rng.normal(size=shape).astype(np.float32)
    coords = rng.uniform(-scale, np.asarray(shape[:3]) + scale, (50, 3))
    want = scipy_interpolation(volume, coords)
    for backend in BACKENDS:
        got = trilinear_interpolation(torch.from_numpy(volume), torch.from_numpy(coords), backend=backend)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)


def test_both_paths_agree_on_a_large_batch_of_streamline_points():
    rng = np.random.default_rng(3)
    volume = torch.from_numpy(rng.random((40, 40, 40, 45), dtype=np.float32))
    coords = torch.from_numpy(random_walks(rng, (40, 40, 40), 200, 100))
    fused = trilinear_interpolation(volume, coords, backend='numba')
    gather = trilinear_interpolation(volume, coords, backend='torch')
    np.testing.assert_allclose(fused.numpy(), gather.numpy(), atol=1e-6, rtol=0)


def test_prefetching_does_not_change_the_result():
    rng = np.random.default_rng(4)
    volume = rng.random((9, 8, 7, 13), dtype=np.float32)
    coords = rng.uniform(-1, 10, (500, 3))
    offsets = neighborhood_offsets('grid', 1)
    plain = _interpolate_numba(volume, coords, offsets, prefetch_ahead=0)
    for ahead in (1, 4, 1000):
        np.testing.assert_array_equal(_interpolate_numba(volume, coords, offsets, prefetch_ahead=ahead), plain)


@settings(max_examples=40, deadline=None)
@given(dims=st.tuples(*[st.integers(2, 9)] * 3), nb_features=st.sampled_from([1, 3, 16, 17, 45]),
       offsets=st.lists(st.tuples(*[st.integers(-3, 3)] * 3), min_size=1, max_size=9), seed=st.integers(0, 2**31))
def test_one_cell_per_point_is_bitwise_the_general_path(dims, nb_features, offsets, seed):
    """Whole-voxel offsets: the kernel finds one cell per point away from the borders; points from
    float32 streamlines (as the sampler gives them), inside, near and past every border."""
    rng = np.random.default_rng(seed)
    volume = rng.random((*dims, nb_features), dtype=np.float32)
    coords = rng.uniform(-1.5, np.array(dims) + 1.5, (400, 3)).astype(np.float32).astype(np.float64)
    offsets = np.asarray(offsets, dtype=np.float64)
    want = _interpolate_numba(volume, coords, offsets, one_cell=False)
    np.testing.assert_array_equal(_interpolate_numba(volume, coords, offsets), want)
    # ... and the reference, offset by offset
    reference = np.concatenate([scipy_interpolation(volume, coords + o) for o in offsets], axis=1)
    np.testing.assert_allclose(want, reference, atol=1e-5, rtol=0)


def test_one_cell_per_point_with_float64_coordinates_and_fractional_offsets():
    "Coordinates that are not float32 values, and offsets in mm that are not whole voxels (the general path)."
    rng = np.random.default_rng(5)
    volume = rng.random((20, 18, 16, 45), dtype=np.float32)
    coords = rng.uniform(-1, 21, (3000, 3))
    for offsets in (neighborhood_offsets('axes', 2), neighborhood_offsets('axes', 1, resolution=0.75)):
        np.testing.assert_allclose(_interpolate_numba(volume, coords, offsets),
                                   _interpolate_numba(volume, coords, offsets, one_cell=False), atol=1e-6, rtol=0)


def test_an_out_that_overlaps_the_inputs_is_refused():
    volume = np.zeros((4, 4, 4, 8), np.float32)
    with pytest.raises(ConfigError, match='overlaps'):
        _interpolate_numba(volume, np.ones((8, 3)), np.zeros((1, 3)), out=volume.reshape(-1)[:64].reshape(8, 8))


# --- neighborhoods --------------------------------------------------------------------------------

@pytest.mark.parametrize('radius', [0, 1, 2, 3])
def test_neighborhood_sizes_and_uniqueness(radius):
    axes = neighborhood_offsets('axes', radius)
    grid = neighborhood_offsets('grid', radius)
    assert axes.shape == (6 * radius + 1, 3) and grid.shape == ((2 * radius + 1) ** 3, 3)
    for offsets in (axes, grid):
        assert np.array_equal(offsets[0], [0, 0, 0])
        assert len(np.unique(offsets, axis=0)) == len(offsets)
    # axes: every non-centre offset lies on one axis, at a whole number of layers
    nonzero = (axes[1:] != 0).sum(axis=1)
    assert np.all(nonzero == 1)
    assert set(np.abs(axes[1:]).max(axis=1)) == set(range(1, radius + 1))
    assert set(map(tuple, grid)) == set(itertools.product(range(-radius, radius + 1), repeat=3))


def test_neighborhood_resolution_and_mm_units():
    vox = neighborhood_offsets('grid', 2, resolution=0.5)
    assert np.allclose(np.abs(vox).max(axis=0), 1.0)
    voxel_sizes = np.array([1.0, 2.0, 0.5])
    mm = neighborhood_offsets('grid', 2, resolution=0.5, units='mm', voxel_sizes=voxel_sizes)
    np.testing.assert_allclose(mm * voxel_sizes, vox)   # the same distances, in mm
    np.testing.assert_allclose(np.abs(neighborhood_offsets('axes', 1, 2.0, 'mm', [2, 4, 1])).max(axis=0), [1, 0.5, 2])
    assert np.array_equal(neighborhood_offsets(None, None), np.zeros((1, 3)))


@pytest.mark.parametrize('bad', [
    dict(kind='cube', radius=1), dict(kind='AXES', radius=1), dict(kind='axes', radius=-1),
    dict(kind='axes', radius=1.0), dict(kind='grid', radius='2'), dict(kind='grid', radius=True),
    dict(kind=None, radius=1), dict(kind='axes', radius=1, resolution=0), dict(kind='axes', radius=1, resolution=-1.0),
    dict(kind='axes', radius=1, resolution=float('nan')), dict(kind='axes', radius=1, resolution='1'),
    dict(kind='axes', radius=1, units='voxels'), dict(kind='axes', radius=1, units='mm'),
    dict(kind='axes', radius=1, units='mm', voxel_sizes=[1, 1]),
    dict(kind='axes', radius=1, units='mm', voxel_sizes=[1, -1, 1])])
def test_nonsense_neighborhoods_are_config_errors(bad):
    with pytest.raises(ConfigError):
        neighborhood_offsets(**bad)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kind, radius, units', [('axes', 1, 'vox'), ('axes', 2, 'mm'), ('grid', 1, 'mm'), (None, 0, 'vox')])
def test_neighborhood_equals_interpolating_each_shifted_point(backend, kind, radius, units):
    rng = np.random.default_rng(5)
    volume = rng.normal(size=(6, 7, 8, 5)).astype(np.float32)
    coords = border_points(volume.shape, rng, n_random=100)[::7]
    offsets = neighborhood_offsets(kind, radius, resolution=0.8, units=units, voxel_sizes=[1.5, 1.0, 2.0])
    got = interpolate_with_neighborhood(torch.from_numpy(volume), torch.from_numpy(coords), offsets, backend=backend)
    assert got.shape == (len(coords), len(offsets) * 5)
    for k, shift in enumerate(offsets):
        np.testing.assert_allclose(got[:, 5 * k:5 * (k + 1)].numpy(), scipy_interpolation(volume, coords + shift),
                                   atol=1e-5, rtol=0)


# --- inputs of every kind -------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
def test_odd_but_valid_inputs(backend):
    rng = np.random.default_rng(6)
    base = rng.random((6, 5, 4, 7), dtype=np.float32)
    coords = rng.uniform(-1, 7, (80, 6))[:, ::2]                    # non-contiguous, float64
    want = scipy_interpolation(base, coords)
    variants = {
        'numpy': (base, coords),
        'non-contiguous volume': (torch.from_numpy(np.ascontiguousarray(base.transpose(2, 0, 1, 3))).permute(1, 2, 0, 3),
                                  torch.from_numpy(coords)),
        'requires grad': (torch.from_numpy(base).requires_grad_(), torch.from_numpy(coords).requires_grad_()),
        'float64 volume': (torch.from_numpy(base.astype(np.float64)), torch.from_numpy(coords)),
    }
    for name, (volume, points) in variants.items():
        got = trilinear_interpolation(volume, points, backend=backend)
        assert isinstance(got, torch.Tensor) and not got.requires_grad and got.dtype == torch.float32, name
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, err_msg=name)
    empty = interpolate_with_neighborhood(torch.from_numpy(base), torch.zeros(0, 3), neighborhood_offsets('axes', 1),
                                          backend=backend)
    assert empty.shape == (0, 7 * 7)


def test_bad_inputs_are_named_errors():
    volume = torch.rand(4, 4, 4, 2)
    cases = [
        (DataError, 'must be 4-D', lambda: trilinear_interpolation(torch.rand(4, 4, 4), torch.zeros(1, 3))),
        (DataError, 'empty', lambda: trilinear_interpolation(torch.rand(0, 4, 4, 2), torch.zeros(1, 3))),
        (DataError, 'real numbers', lambda: trilinear_interpolation(torch.zeros(2, 2, 2, 1, dtype=torch.bool), torch.zeros(1, 3))),
        (DataError, r'\(N, 3\)', lambda: trilinear_interpolation(volume, torch.zeros(5, 2))),
        (DataError, r'\(N, 3\)', lambda: trilinear_interpolation(volume, torch.zeros(3))),
        (DataError, 'first at index 2', lambda: trilinear_interpolation(volume, torch.tensor([[1.0] * 3, [2.0] * 3, [0, float('nan'), 0]]))),
        (ConfigError, 'finite', lambda: interpolate_with_neighborhood(volume, torch.zeros(1, 3), [[0, 0, float('inf')]])),
        (ConfigError, r'\(N, 3\)', lambda: interpolate_with_neighborhood(volume, torch.zeros(1, 3), np.zeros((2, 2)))),
        (ConfigError, 'backend', lambda: trilinear_interpolation(volume, torch.zeros(1, 3), backend='gpu')),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_infinite_coordinates_clamp_to_the_border():
    volume = torch.rand(3, 4, 5, 2)
    got = trilinear_interpolation(volume, torch.tensor([[float('inf'), -float('inf'), 2.5]]))
    np.testing.assert_allclose(got.numpy()[0], volume[2, 0, 2].numpy())


# --- real components: an HDF5 file in dwi_ml's layout, DataLoader workers, threads, CUDA -----------

def test_on_a_dwiml_hdf5_file(tmp_path):
    path = tmp_path / 'data.hdf5'
    write_dwiml_hdf5(path, dims=(6, 7, 5))
    with h5py.File(path, 'r') as f:
        subject = f['sub-01']
        volume = subject['input']['data'][()]
        streamlines = subject['streamlines']['data'][()]
    assert volume.dtype == np.float32 and streamlines.dtype == np.float64
    got = trilinear_interpolation(torch.from_numpy(volume), torch.from_numpy(streamlines))
    np.testing.assert_allclose(got.numpy(), scipy_interpolation(volume, streamlines), atol=1e-5)


class _PointsDataset(Dataset):
    def __init__(self, volume, chunks):
        self.volume, self.chunks = volume, chunks

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return interpolate_with_neighborhood(self.volume, self.chunks[i], neighborhood_offsets('axes', 1))


def test_in_dataloader_workers():
    rng = np.random.default_rng(8)
    volume = torch.from_numpy(rng.random((10, 10, 10, 6), dtype=np.float32))
    chunks = [torch.from_numpy(random_walks(rng, (10, 10, 10), 5, 20)) for _ in range(4)]
    loader = DataLoader(_PointsDataset(volume, chunks), batch_size=None, num_workers=2)
    for chunk, got in zip(chunks, loader):
        want = interpolate_with_neighborhood(volume, chunk, neighborhood_offsets('axes', 1), backend='torch')
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)


def test_threads_share_the_kernel():
    rng = np.random.default_rng(9)
    volume = torch.from_numpy(rng.random((16, 16, 16, 8), dtype=np.float32))
    batches = [torch.from_numpy(random_walks(rng, (16, 16, 16), 20, 50)) for _ in range(4)]
    want = [trilinear_interpolation(volume, b) for b in batches]
    results = [None] * 4

    def work(i):
        results[i] = trilinear_interpolation(volume, batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    for got, expected in zip(results, want):
        assert torch.equal(got, expected)


# --- reused output buffers (results of >= 1 MiB come from interpolation.OUTPUT_BUFFERS) -------

def _big_chunks(rng, nb_chunks, nb_points=8000):
    "Chunks whose 'axes' r=1 result over 6 features is 8000 × 42 float32 = 1.3 MB: pooled buffers."
    return [torch.from_numpy(rng.uniform(0, 10, (nb_points, 3))) for _ in range(nb_chunks)]


def test_results_still_held_are_never_overwritten_and_dropped_ones_are_reused():
    rng = np.random.default_rng(21)
    volume = torch.from_numpy(rng.random((10, 10, 10, 6), dtype=np.float32))
    offsets = neighborhood_offsets('axes', 1)
    chunks = _big_chunks(rng, 6)
    held = [interpolate_with_neighborhood(volume, c, offsets) for c in chunks]   # more than the pool keeps
    for chunk, got in zip(chunks, held):
        assert torch.equal(got, interpolate_with_neighborhood(volume, chunk, offsets, out=torch.empty_like(got)))
    pointers = {t.data_ptr() for t in held}
    assert len(pointers) == len(held)
    del held, got
    again = interpolate_with_neighborhood(volume, chunks[0], offsets)
    assert again.data_ptr() in pointers                    # a buffer nobody holds is reused
    views = [again[:10], again.numpy()[5:], again.detach()]
    del again
    other = interpolate_with_neighborhood(volume, chunks[1], offsets)
    for view in views:                                     # ... but not while any view of it lives
        assert not np.shares_memory(np.asarray(view), other.numpy())


def test_reused_buffers_in_dataloader_workers_and_threads():
    rng = np.random.default_rng(22)
    volume = torch.from_numpy(rng.random((10, 10, 10, 6), dtype=np.float32))
    chunks = _big_chunks(rng, 6)
    want = [interpolate_with_neighborhood(volume, c, neighborhood_offsets('axes', 1), backend='torch') for c in chunks]
    # workers: each result is moved to shared memory to be sent, then the worker reuses its buffer
    loader = DataLoader(_PointsDataset(volume, chunks), batch_size=None, num_workers=2)
    got = list(loader)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-6)
    results = [None] * len(chunks)

    def work(i):
        results[i] = interpolate_with_neighborhood(volume, chunks[i], neighborhood_offsets('axes', 1))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(chunks))]
    for t in threads: t.start()
    for t in threads: t.join()
    for g, w in zip(results, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-6)


@pytest.mark.cuda
@needs_cuda
def test_cuda_matches_cpu():
    rng = np.random.default_rng(10)
    volume = torch.from_numpy(rng.random((9, 9, 9, 5), dtype=np.float32))
    coords = torch.from_numpy(border_points(volume.shape, rng))
    got = interpolate_with_neighborhood(volume.cuda(), coords, neighborhood_offsets('axes', 1))
    assert got.device.type == 'cuda'
    want = interpolate_with_neighborhood(volume, coords, neighborhood_offsets('axes', 1))
    np.testing.assert_allclose(got.cpu().numpy(), want.numpy(), atol=1e-5)
    with pytest.raises(ConfigError):
        trilinear_interpolation(volume.cuda(), coords, backend='numba')


# --- the kernel's tail spill, and writing into out= -------------------------------------------

def eight_corner_gather(volume, coords, offsets):
    "The slow obvious reference: every neighbour point, its 8 clamped corners, float64 weights."
    volume = np.asarray(volume, np.float64)
    size = np.asarray(volume.shape[:3])
    samples = (np.asarray(coords, np.float64)[:, None, :] + np.asarray(offsets)[None]).reshape(-1, 3)
    u = np.clip(samples - 0.5, 0, size - 1)
    low = np.floor(u).astype(np.int64)
    t = u - low
    out = np.zeros((len(samples), volume.shape[3]))
    for corner in itertools.product((0, 1), repeat=3):
        idx = np.minimum(low + corner, size - 1)
        weight = np.prod(np.where(corner, t, 1 - t), axis=1)
        out += weight[:, None] * volume[idx[:, 0], idx[:, 1], idx[:, 2]]
    return out.reshape(len(coords), -1)


@pytest.mark.parametrize('nb_features', [1, 3, 8, 13, 45])
@pytest.mark.parametrize('kind', [None, 'axes', 'grid'])
def test_kernel_matches_the_eight_corner_gather_at_the_volume_end(nb_features, kind):
    # The kernel writes whole SIMD steps past a row's end and reads past a voxel's features; the far
    # corner of the volume and the last output row are where that would leave the arrays.
    rng = np.random.default_rng(nb_features)
    shape = (4, 3, 5, nb_features)
    volume = rng.normal(size=shape).astype(np.float32)
    far = np.asarray(shape[:3], np.float64)
    coords = np.concatenate([rng.uniform(-1, far + 1, (60, 3)), [far - 0.5, far, far + 3, far - 0.75]])
    offsets = neighborhood_offsets(kind, 1 if kind else 0, resolution=0.8)
    offsets = offsets * [1.0, 0.5, 1.7]                      # anisotropic
    want = eight_corner_gather(volume, coords, offsets)
    np.testing.assert_allclose(_interpolate_numba(volume, coords, offsets), want, atol=1e-5, rtol=0)
    # ...and with the volume as a view that ends exactly where the buffer ends
    backing = np.concatenate([rng.normal(size=9).astype(np.float32), volume.reshape(-1)])[9:].reshape(shape)
    np.testing.assert_allclose(_interpolate_numba(backing, coords, offsets), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('nb_features', [3, 45])
def test_out_receives_the_rows_and_nothing_around_them_changes(backend, nb_features):
    rng = np.random.default_rng(7)
    volume = torch.from_numpy(rng.random((9, 8, 7, nb_features), dtype=np.float32))
    coords = rng.uniform(-1, 10, (200, 3))
    offsets = neighborhood_offsets('axes', 1)
    width = len(offsets) * nb_features
    batch = torch.full((260, width), -7.0)
    got = interpolate_with_neighborhood(volume, coords, offsets, out=batch[30:230], backend=backend)
    assert got.data_ptr() == batch[30:230].data_ptr()
    want = interpolate_with_neighborhood(volume, coords, offsets, backend=backend)
    np.testing.assert_array_equal(batch[30:230].numpy(), want.numpy())
    assert (batch[:30] == -7).all() and (batch[230:] == -7).all()
    row = np.full((200, nb_features), -7.0, np.float32)
    assert trilinear_interpolation(volume, coords, out=row, backend=backend) is row
    np.testing.assert_allclose(row, eight_corner_gather(volume.numpy(), coords, np.zeros((1, 3))), atol=1e-5)


def test_out_of_the_wrong_kind_is_a_config_error():
    volume = torch.rand(5, 5, 5, 4)
    coords = torch.rand(10, 3) * 5
    for bad, match in [(torch.empty(10, 5), 'shape'), (torch.empty(9, 4), 'shape'),
                       (torch.empty(10, 4, dtype=torch.float64), 'float32'), (np.empty((10, 4), np.float16), 'float32'),
                       (torch.empty(4, 10).T, 'contiguous'), (torch.empty(10, 4, requires_grad=True), 'grad'),
                       ([[0.0] * 4] * 10, 'tensor or numpy')]:
        with pytest.raises(ConfigError, match=match):
            trilinear_interpolation(volume, coords, out=bad)
    with pytest.raises(ConfigError, match='shape'):
        interpolate_with_neighborhood(volume, coords, neighborhood_offsets('axes', 1), out=torch.empty(10, 4))


@pytest.mark.cuda
@needs_cuda
def test_out_on_cuda():
    volume = torch.rand(6, 6, 6, 5, device='cuda')
    coords = torch.rand(50, 3) * 6
    out = torch.empty(50, 5, device='cuda')
    assert trilinear_interpolation(volume, coords, out=out) is out
    torch.testing.assert_close(out.cpu(), trilinear_interpolation(volume.cpu(), coords), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match='cuda'):
        trilinear_interpolation(volume, coords, out=torch.empty(50, 5))
    with pytest.raises(ConfigError, match='cuda'):
        trilinear_interpolation(volume.cpu(), coords, out=out)
