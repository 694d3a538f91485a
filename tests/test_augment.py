"""Resampling and augmentation of packed streamlines, against dipy and obvious Python loops."""
import functools

import numpy as np
import pytest
import torch
from dipy.data import get_fnames
from dipy.tracking.streamlinespeed import compress_streamlines, length, set_number_of_points

import nibabel as nib
from dwiml_nb.augment import (add_noise, compress, directions, resample_nb_points, resample_step_size,
                              reverse_streamlines, split_streamlines, streamline_lengths_mm)
from dwiml_nb.core import ConfigError, DataError, PackedStreamlines

ANISO = np.diag([1.0, 2.0, 0.5])
_rot = np.linalg.qr(np.random.default_rng(7).normal(size=(3, 3)))[0]
OBLIQUE = _rot @ np.diag([1.25, 0.8, 2.0])  # rotated, anisotropic: no axis-aligned shortcut works


def random_pack(seed, n=60, max_len=50, scale=2.0, dtype=np.float32, contiguous=True):
    """Random walks with empty, 1-, 2-point and repeated-point streamlines; optionally scattered in data."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, max_len, n)
    lens[:5] = [1, 2, 0, 6, 3]
    sl = [np.cumsum(rng.normal(size=(l, 3)) * scale, axis=0) + 40 for l in lens]
    sl[3][2] = sl[3][1]
    sl[4][:] = sl[4][0]  # zero-length 3-point streamline
    p = PackedStreamlines.from_sequence(sl, dtype=dtype)
    if not contiguous:  # same streamlines, stored out of order in `data`
        order = rng.permutation(n)
        q = p.select(order)
        inverse = np.argsort(order)
        p = PackedStreamlines(q.data, q.offsets[inverse], q.lengths[inverse])
    return p


@functools.lru_cache
def fornix():
    "dipy's real tractogram (300 streamlines); its mm coordinates taken as voxel coordinates."
    trk = nib.streamlines.load(get_fnames(name='fornix'))
    return PackedStreamlines.from_sequence(list(trk.streamlines))


PACKS = [pytest.param(lambda: random_pack(0), id='random'),
         pytest.param(lambda: random_pack(1, dtype=np.float64, contiguous=False), id='f64-scattered'),
         pytest.param(lambda: fornix(), id='fornix'),
         pytest.param(lambda: PackedStreamlines.from_sequence([]), id='empty'),
         pytest.param(lambda: PackedStreamlines.from_sequence([np.ones((1, 3))]), id='one-point')]


def to_mm(s, m):
    return np.asarray(s, np.float64) @ m.T


# ---------------------------------------------------------------- resampling

@pytest.mark.parametrize('make', PACKS)
@pytest.mark.parametrize('nb_points', [2, 3, 17, 64])
def test_resample_nb_points_matches_dipy(make, nb_points):
    p = make()
    out = resample_nb_points(p, nb_points)
    assert out.is_contiguous() and out.data.dtype == p.data.dtype and len(out) == len(p)
    for s, got in zip(p, out):
        if len(s) < 2:
            np.testing.assert_array_equal(got, s)
            continue
        if length(np.asarray(s, np.float64)) == 0:  # dipy leaves such outputs uninitialised
            np.testing.assert_array_equal(got, np.repeat(s[:1], nb_points, axis=0))
            continue
        np.testing.assert_allclose(got, set_number_of_points(np.asarray(s, np.float64), nb_points),
                                   atol=2e-4, rtol=1e-5)
        np.testing.assert_array_equal(got[[0, -1]], s[[0, -1]])


@pytest.mark.parametrize('m', [ANISO, OBLIQUE], ids=['aniso', 'oblique'])
def test_resample_nb_points_in_mm_matches_dipy_in_mm(m):
    p = random_pack(2)
    out = resample_nb_points(p, 9, vox_to_mm=m)
    for s, got in zip(p, out):
        if len(s) >= 2 and length(to_mm(s, m)) > 0:
            np.testing.assert_allclose(to_mm(got, m), set_number_of_points(to_mm(s, m), 9), atol=2e-4)


@pytest.mark.parametrize('make', PACKS)
@pytest.mark.parametrize('m', [np.eye(3), ANISO, OBLIQUE], ids=['iso', 'aniso', 'oblique'])
@pytest.mark.parametrize('step', [0.3, 1.0, 7.5])
def test_resample_step_size_matches_scilpy_convention_with_dipy(make, m, step):
    p = make()
    out = resample_step_size(p, step, m)
    assert out.is_contiguous() and out.data.dtype == p.data.dtype and len(out) == len(p)
    for s, got in zip(p, out):
        if len(s) < 2:
            np.testing.assert_array_equal(got, s)
            continue
        s_mm = to_mm(s, m)
        nb = max(2, int(np.ceil(length(s_mm) / step)))  # scilpy's resample_streamlines_step_size
        assert len(got) == nb
        if length(s_mm) == 0:  # dipy leaves such outputs uninitialised
            np.testing.assert_array_equal(got, np.repeat(s[:1], nb, axis=0))
            continue
        np.testing.assert_allclose(to_mm(got, m), set_number_of_points(s_mm, nb), atol=5e-4, rtol=1e-5)


def test_resample_step_size_accepts_affine_or_voxel_sizes():
    p = random_pack(3)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = ANISO, [-90, 120, -60]  # translation does not change lengths
    want = resample_step_size(p, 0.8, ANISO)
    for other in (affine, np.diag(ANISO)):
        got = resample_step_size(p, 0.8, other)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_array_equal(got.data, want.data)


def test_zero_length_streamline_resamples_to_copies_of_its_point():
    p = PackedStreamlines.from_sequence([np.full((4, 3), 5.0)])
    np.testing.assert_array_equal(resample_step_size(p, 1.0, np.eye(3)).data, np.full((2, 3), 5.0))
    np.testing.assert_array_equal(resample_nb_points(p, 6).data, np.full((6, 3), 5.0))


@pytest.mark.parametrize('make', PACKS)
@pytest.mark.parametrize('m', [ANISO, OBLIQUE], ids=['aniso', 'oblique'])
def test_streamline_lengths_mm_match_dipy(make, m):
    p = make()
    want = [length(to_mm(s, m)) if len(s) else 0.0 for s in p]
    np.testing.assert_allclose(streamline_lengths_mm(p, m), want, rtol=1e-10)


# ---------------------------------------------------------------- compression

# small steps: many nearly collinear points to drop
COMPRESS_PACKS = PACKS + [pytest.param(lambda: random_pack(4, scale=0.2), id='random-small-steps')]


@pytest.mark.parametrize('make', COMPRESS_PACKS)
@pytest.mark.parametrize('m', [np.eye(3), ANISO, OBLIQUE], ids=['iso', 'aniso', 'oblique'])
@pytest.mark.parametrize('tol,max_seg', [(0.0, 10.0), (0.1, 10.0), (0.5, 3.0), (2.0, np.inf)])
def test_compress_matches_dipy_in_mm(make, m, tol, max_seg):
    p = make()
    out = compress(p, tol, m, max_segment_length_mm=max_seg)
    assert out.is_contiguous() and out.data.dtype == p.data.dtype and len(out) == len(p)
    for s, got in zip(p, out):
        want_mm = compress_streamlines(to_mm(s, m), tol_error=tol, max_segment_length=max_seg)
        assert len(got) == len(want_mm)
        np.testing.assert_allclose(to_mm(got, m), want_mm, rtol=1e-9, atol=1e-9)


def test_compress_keeps_the_turning_point_of_a_streamline_that_comes_back():
    # The chord from the first point to the fourth has zero length: dipy's distance is NaN -> keep.
    back = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 0, 0], [0, 1, 0], [0, 2, 0]], np.float32)
    out = compress(PackedStreamlines.from_sequence([back]), 0.5, ANISO)
    want_mm = compress_streamlines(to_mm(back, ANISO), tol_error=0.5)
    np.testing.assert_allclose(to_mm(out[0], ANISO), want_mm)
    assert [2, 0, 0] in out[0].tolist()


def test_compress_removes_points_of_a_straight_line_and_keeps_only_original_points():
    line = np.linspace([0, 0, 0], [8, 4, 2], 30)
    bent = np.concatenate([line, line[-1] + np.linspace([0, 0, 0], [0, 5, 0], 10)[1:]])
    p = PackedStreamlines.from_sequence([line, bent])
    out = compress(p, 0.01, np.eye(3), max_segment_length_mm=np.inf)
    np.testing.assert_array_equal(out.lengths, [2, 3])
    np.testing.assert_allclose(out[1], bent[[0, 29, -1]], atol=1e-6)
    # every output point is one of the input points
    assert all((np.abs(p.data[:, None] - q).sum(-1) == 0).any() for q in out.data)


# ---------------------------------------------------------------- split

@pytest.mark.parametrize('make', PACKS)
@pytest.mark.parametrize('ratio', [0.0, 0.3, 1.0])
@pytest.mark.parametrize('min_half', [1, 2, 5])
def test_split_keeps_every_point_once(make, ratio, min_half):
    p = make()
    out, src = split_streamlines(p, ratio, np.random.default_rng(5), min_points_per_half=min_half)
    assert out.is_contiguous() and len(src) == len(out)
    np.testing.assert_array_equal(src, np.sort(src))
    counts = np.bincount(src, minlength=len(p))
    assert counts.max(initial=1) <= 2
    for i, s in enumerate(p):  # the parts of streamline i, joined in order, are streamline i
        parts = [out[j] for j in np.flatnonzero(src == i)]
        np.testing.assert_array_equal(np.concatenate(parts), s)
        if len(parts) == 2:
            assert min(len(parts[0]), len(parts[1])) >= min_half
    eligible = p.lengths >= 2 * min_half
    assert not (counts == 2)[~eligible].any()  # too short: left whole
    if ratio == 0:
        np.testing.assert_array_equal(src, np.arange(len(p)))
        np.testing.assert_array_equal(out.lengths, p.lengths)
    if ratio == 1:
        np.testing.assert_array_equal(counts == 2, eligible)


def test_split_fraction_and_cut_points_are_spread():
    p = PackedStreamlines.from_sequence([np.arange(30.0).reshape(10, 3)] * 4000)
    out, src = split_streamlines(p, 0.25, np.random.default_rng(6))
    n_split = int((np.bincount(src) == 2).sum())
    assert abs(n_split - 1000) < 5 * np.sqrt(4000 * 0.25 * 0.75)  # binomial, 5 sigma
    first_halves = out.lengths[np.flatnonzero(np.diff(src) == 0)]
    np.testing.assert_array_equal(np.unique(first_halves), np.arange(2, 9))  # every cut from 2 to 8


def test_split_same_seed_same_result():
    p = random_pack(8)
    a = split_streamlines(p, 0.5, np.random.default_rng([1, 2, 3]))
    b = split_streamlines(p, 0.5, np.random.default_rng([1, 2, 3]))
    c = split_streamlines(p, 0.5, np.random.default_rng([1, 2, 4]))
    np.testing.assert_array_equal(a[0].lengths, b[0].lengths)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0].lengths, c[0].lengths)


# ---------------------------------------------------------------- reverse

@pytest.mark.parametrize('make', PACKS)
@pytest.mark.parametrize('ratio', [0.0, 0.5, 1.0])
def test_reverse_matches_loop_and_twice_is_identity(make, ratio):
    p = make()
    out, flipped = reverse_streamlines(p, ratio, np.random.default_rng(9))
    assert out.is_contiguous() and len(flipped) == len(p)
    for s, got, f in zip(p, out, flipped):
        np.testing.assert_array_equal(got, s[::-1] if f else s)
    if ratio == 0:
        assert not flipped.any()
    if ratio == 1:
        assert flipped.all()
    back, flipped_again = reverse_streamlines(out, ratio, np.random.default_rng(9))
    np.testing.assert_array_equal(flipped_again, flipped)
    for s, got in zip(p, back):
        np.testing.assert_array_equal(got, s)


def test_reverse_fraction():
    p = PackedStreamlines.from_sequence([np.arange(6.0).reshape(2, 3)] * 4000)
    _, flipped = reverse_streamlines(p, 0.7, np.random.default_rng(10))
    assert abs(flipped.sum() - 2800) < 5 * np.sqrt(4000 * 0.7 * 0.3)


# ---------------------------------------------------------------- noise

@pytest.mark.parametrize('m', [np.eye(3), ANISO, OBLIQUE], ids=['iso', 'aniso', 'oblique'])
def test_noise_has_requested_std_in_mm(m):
    p = PackedStreamlines.from_sequence([np.zeros((200, 3))] * 200)
    out = add_noise(p, 0.4, np.random.default_rng(11), m, max_mm=np.inf)
    noise_mm = to_mm(out.data, m)
    np.testing.assert_allclose(noise_mm.mean(axis=0), 0, atol=0.01)
    np.testing.assert_allclose(np.cov(noise_mm.T), 0.16 * np.eye(3), atol=0.16 * 0.03)


def test_noise_is_clipped_per_mm_axis():
    p = PackedStreamlines.from_sequence([np.zeros((200, 3))] * 200)
    noise_mm = to_mm(add_noise(p, 0.4, np.random.default_rng(12), OBLIQUE).data, OBLIQUE)
    assert np.abs(noise_mm).max() <= 0.8 + 1e-5 and np.abs(noise_mm).max() > 0.79
    # A normal clipped at 2 std keeps 0.9594 of its std: E[min(Z^2, 4)] = 0.9205
    np.testing.assert_allclose(noise_mm.std(axis=0), 0.4 * 0.9594, rtol=0.02)
    noise_mm = to_mm(add_noise(p, 0.4, np.random.default_rng(12), OBLIQUE, max_mm=0.1).data, OBLIQUE)
    assert np.abs(noise_mm).max() <= 0.1 + 1e-5


def test_noise_same_seed_same_result_and_zero_std_is_identity():
    p = random_pack(13)
    a = add_noise(p, 0.2, np.random.default_rng([4, 0, 7]), ANISO)
    b = add_noise(p, 0.2, np.random.default_rng([4, 0, 7]), ANISO)
    c = add_noise(p, 0.2, np.random.default_rng([4, 0, 8]), ANISO)
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data) and a.data.dtype == p.data.dtype
    np.testing.assert_array_equal(add_noise(p, 0.0, np.random.default_rng(0), ANISO).data, p.data)
    np.testing.assert_array_equal(a.lengths, p.lengths)


# ---------------------------------------------------------------- directions

@pytest.mark.parametrize('make', PACKS)
@pytest.mark.parametrize('m', [None, OBLIQUE], ids=['vox', 'mm'])
def test_directions_match_loop(make, m):
    p = make()
    d = directions(p, m)
    np.testing.assert_array_equal(d.lengths, np.maximum(p.lengths - 1, 0))
    for s, got in zip(p, d):
        want = []
        for a, b in zip(s[:-1], s[1:]):
            v = np.asarray(b, np.float64) - a
            v = v @ m.T if m is not None else v
            want.append(v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else np.zeros(3))
        np.testing.assert_allclose(got, np.reshape(want, (-1, 3)), atol=1e-6)


# ---------------------------------------------------------------- bad arguments

P0 = random_pack(14)
RNG = np.random.default_rng(0)


@pytest.mark.parametrize('call', [
    lambda: resample_nb_points(P0, 1), lambda: resample_nb_points(P0, 0), lambda: resample_nb_points(P0, 2.5),
    lambda: resample_nb_points(P0, True), lambda: resample_nb_points(P0, 5, vox_to_mm=np.zeros((3, 3))),
    lambda: resample_step_size(P0, 0, ANISO), lambda: resample_step_size(P0, -1.0, ANISO),
    lambda: resample_step_size(P0, np.nan, ANISO), lambda: resample_step_size(P0, 1.0, np.ones((2, 2))),
    lambda: resample_step_size(P0, 1.0, [1, 0, 1]), lambda: resample_step_size(P0, 1.0, [1, np.nan, 1]),
    lambda: compress(P0, -0.1, ANISO), lambda: compress(P0, 0.1, ANISO, max_segment_length_mm=0),
    lambda: split_streamlines(P0, -0.1, RNG), lambda: split_streamlines(P0, 1.01, RNG),
    lambda: split_streamlines(P0, np.nan, RNG), lambda: split_streamlines(P0, 0.5, RNG, min_points_per_half=0),
    lambda: reverse_streamlines(P0, -0.5, RNG), lambda: reverse_streamlines(P0, 2, RNG),
    lambda: add_noise(P0, -0.1, RNG, ANISO), lambda: add_noise(P0, np.inf, RNG, ANISO),
    lambda: add_noise(P0, 0.1, RNG, ANISO, max_mm=0), lambda: add_noise(P0, 0.1, RNG, ANISO, max_mm=-1),
    lambda: streamline_lengths_mm(P0, np.eye(4)[:3]),
])
def test_bad_arguments_raise_config_error(call):
    with pytest.raises(ConfigError):
        call()


def test_malformed_pack_raises_data_error():
    bad = PackedStreamlines(np.zeros((5, 2), np.float32), np.array([0]), np.array([5]))
    with pytest.raises(DataError, match=r'data \(5, 2\)'):
        resample_nb_points(bad, 4)


# ---------------------------------------------------------------- RNG per batch, not per worker

class _Batches(torch.utils.data.Dataset):
    def __init__(self, pack): self.pack = pack
    def __len__(self): return 8
    def __getitem__(self, i): return i


def _augment_batch(items, pack=random_pack(15), seed=1234, epoch=3):
    # What the sampler's load_batch does: an RNG from (seed, epoch, batch index), then every step.
    (batch_index,) = items
    rng = np.random.default_rng([seed, epoch, batch_index])
    q = resample_step_size(pack, 0.7, ANISO)
    q, src = split_streamlines(q, 0.5, rng)
    q, flipped = reverse_streamlines(q, 0.5, rng)
    q = add_noise(q, 0.1, rng, ANISO)
    return q.data, q.lengths, src, flipped


def test_augmented_batches_do_not_depend_on_number_of_workers():
    def run(workers):
        loader = torch.utils.data.DataLoader(_Batches(None), batch_size=1, num_workers=workers,
                                             collate_fn=_augment_batch, multiprocessing_context='fork'
                                             if workers else None)
        return list(loader)
    alone, two = run(0), run(2)
    assert len(alone) == len(two) == 8
    for a, b in zip(alone, two):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(alone[0][0], alone[1][0])  # batches differ from each other
