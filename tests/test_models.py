"""Tests of dwiml_nb.models: loss and error against references, batch == step by step, that the
model really learns (toy data and the demo phantom), tracking (oracle and trained), rebuilding."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

from dwiml_nb import lstm_cpu
from dwiml_nb.core import ConfigError, DataError, PackedStreamlines
from dwiml_nb.models import (DirectionGetterModel, _padded_layout, angular_error_degrees, compute_loss_on_batch,
                             cosine_direction_loss, direction_targets, previous_directions, track)
from dwiml_nb.sampler import StreamlineBatch


def hemisphere(n):
    i = np.arange(n) + 0.5
    z, phi = i / n, np.pi * (1 + 5 ** 0.5) * i
    r = np.sqrt(1 - z ** 2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


SPHERE = hemisphere(16)


def odf(directions, noise=0.0, rng=None):
    "Sign-symmetric, ODF-like response of the sphere's directions to unit `directions` (N, 3)."
    resp = np.exp(-8.0 * (1 - (np.asarray(directions) @ SPHERE.T) ** 2))
    if noise:
        resp = resp + noise * rng.normal(size=resp.shape)
    return resp.astype(np.float32)


def make_batch(streams, features):
    "A real StreamlineBatch (the sampler's class) from lists of (n_i, 3) points and (n_i, F) features."
    packed = PackedStreamlines.from_sequence(streams)
    n = len(packed)
    return StreamlineBatch(packed, np.zeros(n, np.int64), np.arange(n, dtype=np.int64),
                           torch.from_numpy(np.concatenate(features).astype(np.float32)), 0, 0)


def curve_batch(rng, nb_streamlines=32, nb_points=20, straight_ratio=0.3, point_noise=0.0):
    """Arcs (random radius, plane, way) and straight lines, step 0.5, with noisy ODF features of their
    tangent; ``point_noise`` (voxels) moves the points off the curve, as the sampler's noise augmentation."""
    streams, feats = [], []
    for _ in range(nb_streamlines):
        # QR's Q has a sign convention (its first column points to -x): random signs undo the bias.
        basis = np.linalg.qr(rng.normal(size=(3, 3)))[0] * rng.choice([-1, 1], size=3)
        if rng.uniform() < straight_ratio:
            p = np.outer(0.5 * np.arange(nb_points), basis[0])
        else:
            radius, start = rng.uniform(3, 15), rng.uniform(0, 2 * np.pi)
            t = start + rng.choice([-1, 1]) * 0.5 * np.arange(nb_points) / radius
            p = radius * np.stack([np.cos(t), np.sin(t), 0 * t], 1) @ basis.T
        tangent = np.gradient(p, axis=0)
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
        streams.append((p + point_noise * rng.normal(size=p.shape)).astype(np.float32))
        feats.append(odf(tangent, 0.05, rng))
    return make_batch(streams, feats)


def mean_angular_error(model, batch):
    model.eval()
    with torch.no_grad():
        streams = batch.streamlines_as_tensors()
        return angular_error_degrees(model(batch.inputs_per_streamline(), streams), direction_targets(streams)).item()


def train(model, batches, nb_steps, lr=1e-2):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # Decaying the learning rate to a tenth settles the last steps' noise (a steadier direction).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - 0.9 * step / nb_steps)
    for step in range(nb_steps):
        model.train()
        optimizer.zero_grad()
        loss, n = compute_loss_on_batch(model, batches(step), 'cpu')
        loss.backward()
        optimizer.step()
        schedule.step()
    return model


@pytest.fixture(autouse=True, scope='module')
def one_torch_thread():
    # Small models on a shared 2-core machine: two spinning threads are 10-30x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- loss and error
def test_loss_is_zero_for_perfect_one_for_orthogonal_two_for_opposite():
    rng = np.random.default_rng(0)
    d = torch.tensor(rng.normal(size=(50, 3)), dtype=torch.float32)
    ortho = torch.linalg.cross(d, torch.tensor(rng.normal(size=(50, 3)), dtype=torch.float32), dim=1)
    assert cosine_direction_loss(d, 3 * d).item() == pytest.approx(0, abs=1e-6)
    assert cosine_direction_loss(d, ortho).item() == pytest.approx(1, abs=1e-5)
    assert cosine_direction_loss(d, -d).item() == pytest.approx(2, abs=1e-6)
    assert cosine_direction_loss(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0


def test_angular_error_matches_numpy_arccos_including_near_parallel():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 3))
    b = np.concatenate([rng.normal(size=(400, 3)), a[400:] + 1e-3 * rng.normal(size=(100, 3))])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    want = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    got = angular_error_degrees(torch.tensor(a), torch.tensor(b), reduction='none').numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert angular_error_degrees(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(want.mean(), abs=1e-6)
    with pytest.raises(ConfigError, match='shape'):
        angular_error_degrees(torch.zeros(3, 3), torch.zeros(2, 3))


def test_direction_targets_against_a_loop_and_refuse_duplicate_points():
    rng = np.random.default_rng(2)
    streams = [rng.normal(size=(n, 3)).astype(np.float32) for n in (5, 1, 2, 7)]
    want = np.concatenate([np.diff(s, axis=0) / np.linalg.norm(np.diff(s, axis=0), axis=1, keepdims=True)
                           for s in streams])
    for source in (PackedStreamlines.from_sequence(streams), [torch.tensor(s) for s in streams],
                   make_batch(streams, [np.zeros((len(s), 1)) for s in streams])):
        np.testing.assert_allclose(direction_targets(source).numpy(), want, atol=1e-6)
    streams[3][4] = streams[3][3]
    with pytest.raises(DataError, match=r'identical consecutive points.*\[3\]'):
        direction_targets(PackedStreamlines.from_sequence(streams))


def test_previous_directions_against_a_loop():
    rng = np.random.default_rng(3)
    streams = [rng.normal(size=(n, 3)) for n in (6, 1, 2, 4)]
    rows = []
    for s in streams:
        d = np.diff(s, axis=0)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        rows += [np.concatenate([d[j - m - 1] if j > m else np.zeros(3) for m in range(3)]) for j in range(len(s))]
    points = torch.tensor(np.concatenate(streams))
    got = previous_directions(points, torch.tensor([6, 1, 2, 4]), 3)
    np.testing.assert_allclose(got.numpy(), np.array(rows), atol=1e-6)


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize('rnn,nb_layers,prev', [('lstm', 1, 1), ('gru', 2, 2), ('lstm', 2, 0)])
def test_batch_forward_equals_step_by_step_per_streamline(rnn, nb_layers, prev):
    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    model = DirectionGetterModel(7, hidden_size=16, nb_layers=nb_layers, rnn=rnn, use_previous_dirs=prev,
                                 dropout=0.3).eval()
    streams = [torch.tensor(np.cumsum(rng.normal(size=(n, 3)), 0), dtype=torch.float32) for n in (9, 1, 2, 5, 3)]
    inputs = [torch.randn(len(s), 7) for s in streams]
    with torch.no_grad():
        batched = model(inputs, streams)
        stepwise = []
        for x, s in zip(inputs, streams):
            state = None
            for j in range(len(s) - 1):
                prev_dirs = previous_directions(s[:j + 1], torch.tensor([j + 1]), prev)[-1:]
                d, state = model.step(x[j:j + 1], prev_dirs, state)
                stepwise.append(d)
    assert batched.shape == (15, 3)
    np.testing.assert_allclose(batched.numpy(), torch.cat(stepwise).numpy(), atol=1e-5)
    np.testing.assert_allclose(torch.linalg.vector_norm(batched, dim=1).numpy(), 1, atol=1e-5)


def paths_run(model, inputs, streams):
    """Outputs and parameter gradients of `model` on each path: its default (on CPU, the packed LSTM
    kernel for an LSTM), padded length buckets, then the former packed path (the reference)."""
    results = []
    for packed, kernel in ((False, True), (False, False), (True, False)):
        model._packed, model._cpu_kernel = packed, kernel
        out = model(inputs, streams)
        weights = torch.linspace(-1, 2, out.numel()).reshape(out.shape)
        results.append((out.detach(), torch.autograd.grad((out * weights).sum(), list(model.parameters()))))
    model._packed, model._cpu_kernel = False, True
    return results


@pytest.mark.parametrize('rnn,nb_layers,prev,max_len', [('lstm', 1, 1, 30), ('gru', 2, 2, 30), ('lstm', 3, 0, 300),
                                                        ('gru', 1, 1, 300), ('lstm', 2, 1, 120)])
@pytest.mark.slow
def test_every_recurrence_path_equals_the_packed_reference_outputs_and_gradients(rnn, nb_layers, prev, max_len):
    # Random lengths with 1- and 2-point streamlines; max_len 300 spreads them over several buckets.
    torch.manual_seed(1)
    rng = np.random.default_rng(7)
    lengths = np.concatenate([[1, 2, 1, 2], rng.integers(1, max_len, 120)])
    model = DirectionGetterModel(6, hidden_size=12, nb_layers=nb_layers, rnn=rnn, use_previous_dirs=prev,
                                 dropout=0.4).eval()
    streams = [torch.tensor(np.cumsum(rng.normal(size=(n, 3)), 0), dtype=torch.float32) for n in lengths]
    inputs = [torch.randn(n, 6) for n in lengths]
    assert max_len < 100 or len(_padded_layout(lengths[lengths > 1] - 1)[1]) > 1   # several buckets
    *paths, (packed, packed_grads) = paths_run(model, inputs, streams)
    for out, grads in paths:
        assert out.shape == (int((lengths - 1).sum()), 3)
        torch.testing.assert_close(out, packed, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, packed_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not lstm_cpu.SGEMM_AVAILABLE, reason="this torch build's CPU library has no sgemm_")
def test_an_lstm_on_cpu_trains_on_the_packed_kernel_and_a_gru_does_not(monkeypatch):
    calls = []
    real = lstm_cpu.run_packed_lstm
    monkeypatch.setattr(lstm_cpu, 'run_packed_lstm', lambda *a: calls.append(1) or real(*a))
    batch = curve_batch(np.random.default_rng(0), nb_streamlines=5, nb_points=8)
    for rnn, expected in (('lstm', 1), ('gru', 0)):
        calls.clear()
        compute_loss_on_batch(DirectionGetterModel(16, hidden_size=8, rnn=rnn), batch, 'cpu')[0].backward()
        assert len(calls) == expected
    # Without torch's sgemm an LSTM takes the padded buckets, and still trains.
    monkeypatch.setattr(lstm_cpu, 'SGEMM_AVAILABLE', False)
    calls.clear()
    model = DirectionGetterModel(16, hidden_size=8)
    compute_loss_on_batch(model, batch, 'cpu')[0].backward()
    assert not calls and all(p.grad is not None for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_the_model_on_cuda_equals_the_cpu_kernel():
    # CUDA runs the padded recurrence (cuDNN, one bucket), CPU the packed kernel: same outputs and gradients.
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    lengths = np.concatenate([[1, 2], rng.integers(1, 80, 60)])
    model = DirectionGetterModel(6, hidden_size=32, nb_layers=2, use_previous_dirs=2).eval()
    streams = [torch.tensor(np.cumsum(rng.normal(size=(n, 3)), 0), dtype=torch.float32) for n in lengths]
    inputs = [torch.randn(n, 6) for n in lengths]
    results = []
    for device in ('cpu', 'cuda'):
        model.to(device)
        out = model([x.to(device) for x in inputs], [s.to(device) for s in streams])
        weights = torch.linspace(-1, 2, out.numel(), device=device).reshape(out.shape)
        grads = torch.autograd.grad((out * weights).sum(), list(model.parameters()))
        results.append((out.cpu(), [g.cpu() for g in grads]))
    (cpu, cpu_grads), (cuda, cuda_grads) = results
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)
    for a, b in zip(cuda_grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_loss_on_a_batch_is_the_loss_of_the_per_streamline_call():
    # compute_loss_on_batch passes all the points at once; the list form must give the same.
    rng = np.random.default_rng(8)
    batch = curve_batch(rng, nb_streamlines=9, nb_points=12)
    model = DirectionGetterModel(16, hidden_size=8)
    loss, n = compute_loss_on_batch(model, batch, 'cpu')
    streams = batch.streamlines_as_tensors()
    expected = cosine_direction_loss(model(batch.inputs_per_streamline(), streams), direction_targets(streams))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match='list of per-streamline'):
        model(batch.inputs, streams)


def test_a_checkpoint_of_the_former_model_loads_and_predicts_the_same():
    torch.manual_seed(2)
    former = DirectionGetterModel(5, hidden_size=8, nb_layers=2, use_previous_dirs=2)
    former._packed = True
    state = former.state_dict()
    model = DirectionGetterModel(**former.get_params())
    model.load_state_dict(state)   # strict: the same parameter names
    inputs, streams = [torch.randn(n, 5) for n in (4, 9)], [torch.cumsum(torch.randn(n, 3), 0) for n in (4, 9)]
    torch.testing.assert_close(model.eval()(inputs, streams), former.eval()(inputs, streams), rtol=1e-5, atol=1e-6)


def test_loss_on_a_real_batch_has_gradients_and_counts_predicted_points():
    rng = np.random.default_rng(5)
    batch = curve_batch(rng, nb_streamlines=6, nb_points=10)
    model = DirectionGetterModel(16, hidden_size=8)
    loss, n = compute_loss_on_batch(model, batch, torch.device('cpu'))
    assert n == 6 * 9 and loss.ndim == 0 and 0 < loss.item() < 2
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Streamlines of a single point predict nothing, and still give a usable loss.
    single = make_batch([np.zeros((1, 3), np.float32)] * 2, [np.zeros((1, 16))] * 2)
    loss, n = compute_loss_on_batch(model, single, 'cpu')
    assert n == 0 and loss.item() == 0
    loss.backward()


def test_model_runs_where_its_inputs_are():
    model = DirectionGetterModel(4, hidden_size=8).to(torch.float32)
    inputs, streams = [torch.randn(5, 4)], [torch.cumsum(torch.randn(5, 3), 0)]
    assert model(inputs, streams).device == inputs[0].device
    if torch.cuda.is_available():  # the same on a GPU when there is one
        model = model.cuda()
        out = model([x.cuda() for x in inputs], [s.cuda() for s in streams])
        assert out.is_cuda and direction_targets([s.cuda() for s in streams]).is_cuda


def test_get_params_rebuilds_the_same_model():
    model = DirectionGetterModel(12, hidden_size=10, nb_layers=2, rnn='gru', use_previous_dirs=3, dropout=0.25)
    params = json.loads(json.dumps(model.get_params()))
    rebuilt = DirectionGetterModel(**params)
    assert rebuilt.get_params() == model.get_params()
    rebuilt.load_state_dict(model.state_dict())
    inputs, streams = [torch.randn(6, 12)], [torch.cumsum(torch.randn(6, 3), 0)]
    torch.testing.assert_close(rebuilt.eval()(inputs, streams), model.eval()(inputs, streams))


@pytest.mark.parametrize('kwargs,match', [
    (dict(nb_features=0), 'nb_features'), (dict(nb_features=3, hidden_size=2.5), 'hidden_size'),
    (dict(nb_features=3, rnn='rnn'), 'lstm'), (dict(nb_features=3, dropout=1.0), 'dropout'),
    (dict(nb_features=3, use_previous_dirs=-1), 'use_previous_dirs')])
def test_bad_parameters_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DirectionGetterModel(**kwargs)


def test_mismatched_inputs_are_clear_errors():
    model = DirectionGetterModel(4, hidden_size=8)
    with pytest.raises(ConfigError, match='expects 4 input features'):
        model([torch.randn(3, 5)], [torch.randn(3, 3)])
    with pytest.raises(ConfigError, match='pass the streamlines'):
        model([torch.randn(3, 4)])
    with pytest.raises(DataError, match='number of points'):
        model([torch.randn(3, 4)], [torch.randn(4, 3)])
    empty = StreamlineBatch(PackedStreamlines.from_sequence([np.zeros((2, 3))]), np.zeros(1, np.int64),
                            np.zeros(1, np.int64), None, 0, 0)
    with pytest.raises(ConfigError, match='no inputs'):
        compute_loss_on_batch(model, empty, 'cpu')


# ---------------------------------------------------------------- it learns
@pytest.mark.slow
def test_training_drops_the_angular_error_well_below_an_untrained_model():
    torch.manual_seed(0)
    rng = np.random.default_rng(6)
    validation = curve_batch(np.random.default_rng(100), nb_streamlines=128)
    model = DirectionGetterModel(16, hidden_size=32, rnn='gru')
    untrained = mean_angular_error(model, validation)
    train(model, lambda step: curve_batch(rng), 200)
    trained = mean_angular_error(model, validation)
    assert untrained > 60
    assert trained < 15 and trained < untrained / 4, (untrained, trained)


def phantom_inputs(features, streams):
    "Trilinear interpolation (scipy, voxel centres at i + 0.5) of the phantom's features at the points."
    coords = (streams.data - 0.5).T
    return np.stack([map_coordinates(features[..., k], coords, order=1, mode='nearest')
                     for k in range(features.shape[-1])], 1).astype(np.float32)


def phantom_batches(subject_seed, nb_streamlines_per_bundle):
    data = pytest.importorskip('dwiml_nb.data')
    rng = np.random.default_rng(subject_seed)
    bundles = data.phantom_subject(rng, nb_streamlines_per_bundle=nb_streamlines_per_bundle)
    streams = PackedStreamlines.concatenate(bundles.values())
    features, _ = data.orientation_features(streams, data.PHANTOM_SHAPE, noise_std=0.1, rng=rng)
    return streams, phantom_inputs(features, streams)


def test_training_on_the_demo_phantom_beats_an_untrained_model():
    torch.manual_seed(0)
    train_streams, train_inputs = phantom_batches(0, 30)
    valid_streams, valid_inputs = phantom_batches(1, 10)
    split = lambda x, lengths: np.split(x, np.cumsum(lengths)[:-1])
    valid = make_batch(valid_streams.to_list(), split(valid_inputs, valid_streams.lengths))
    all_inputs = split(train_inputs, train_streams.lengths)
    rng = np.random.default_rng(7)

    def batches(step):
        ids = rng.choice(len(train_streams), 16, replace=False)
        return make_batch([train_streams[i] for i in ids], [all_inputs[i] for i in ids])

    model = DirectionGetterModel(train_inputs.shape[1], hidden_size=32)
    untrained = mean_angular_error(model, valid)
    train(model, batches, 120)
    trained = mean_angular_error(model, valid)
    assert trained < 25 and trained < untrained / 2.5, (untrained, trained)


# ---------------------------------------------------------------- tracking
class Oracle(DirectionGetterModel):
    "The perfect model: its input is the field's axis, which it follows in the way it was going."
    def __init__(self):
        super().__init__(nb_features=3, hidden_size=1, use_previous_dirs=1)

    def step(self, features, previous_dirs=None, state=None):
        d = F.normalize(features, dim=1)
        if previous_dirs is not None:
            d = torch.where((d * previous_dirs).sum(1, keepdim=True) < 0, -d, d)
        return d, torch.zeros(1, len(features), 1)


def constant_field(direction):
    direction = torch.tensor(direction, dtype=torch.float32)
    return lambda coords: direction.expand(len(coords), 3)


VOLUME = np.zeros((20, 20, 6, 1), np.float32)


def test_oracle_tracks_a_straight_line_to_the_border_and_respects_max_steps():
    tracked = track(Oracle(), VOLUME, [[2.25, 5.5, 2.5], [3.0, 5.0, 2.0]], 0.5, 100, constant_field([1., 0, 0]))
    assert tracked.lengths.tolist() == [36, 34]  # last points 19.75 and 19.5: the next one leaves the volume
    np.testing.assert_allclose(tracked[0], np.c_[2.25 + 0.5 * np.arange(36), np.full((36, 2), [5.5, 2.5])])
    capped = track(Oracle(), VOLUME, [[2.25, 5.5, 2.5]], 0.5, 10, constant_field([1., 0, 0]))
    assert capped.lengths.tolist() == [11]
    assert tracked.data.dtype == np.float32 and tracked.is_contiguous()


def test_oracle_on_circles_follows_forward_euler_exactly():
    center = torch.tensor([10., 10., 0.])

    def circle(coords):
        r = coords - center
        return torch.stack([-r[:, 1], r[:, 0], torch.zeros_like(r[:, 0])], 1)

    tracked = track(Oracle(), VOLUME, [[14., 10, 2], [16., 10, 3]], 0.25, 80, circle)
    k = np.arange(81)
    for i, r0 in enumerate((4, 6)):
        radii = np.linalg.norm(tracked[i][:, :2] - 10, axis=1)
        np.testing.assert_allclose(radii, np.sqrt(r0 ** 2 + k * 0.25 ** 2), atol=1e-4)


def test_tracking_stops_at_the_mask_at_sharp_turns_and_keeps_seeds_outside():
    mask = np.zeros(VOLUME.shape[:3], bool)
    mask[:10] = True
    tracked = track(Oracle(), VOLUME, [[2.25, 5.5, 2.5], [15., 5, 2]], 0.5, 100, constant_field([1., 0, 0]),
                    mask=mask)
    assert tracked.lengths.tolist() == [16, 1]  # 2.25 .. 9.75; a seed outside the mask stays a 1-point streamline
    np.testing.assert_allclose(tracked[1], [[15., 5, 2]])

    def zigzag(coords):  # turns by 90° at x >= 6
        return torch.where(coords[:, :1] < 6, torch.tensor([[1., 0, 0]]), torch.tensor([[0., 1, 0]]))

    sharp = track(Oracle(), VOLUME, [[2.25, 5.5, 2.5]], 0.5, 100, zigzag, max_angle_deg=60)
    assert sharp[0][-1, 0] == pytest.approx(6.25) and sharp.lengths.tolist() == [9]
    lenient = track(Oracle(), VOLUME, [[2.25, 5.5, 2.5]], 0.5, 100, zigzag, max_angle_deg=95)
    assert lenient.lengths[0] > 9 and lenient[0][-1, 1] > 15


def test_both_directions_join_through_the_seed_once():
    tracked = track(Oracle(), VOLUME, [[2.25, 5.5, 2.5], [8.25, 5.5, 2.5]], 0.5, 100, constant_field([1., 0, 0]),
                    both_directions=True, initial_directions=[[-1., 0, 0], [1, 0, 0]])
    assert tracked.lengths.tolist() == [40, 40]
    np.testing.assert_allclose(tracked[0][:, 0], 19.75 - 0.5 * np.arange(40))  # first way was -x
    np.testing.assert_allclose(tracked[1][:, 0], 0.25 + 0.5 * np.arange(40))


def test_tracking_errors():
    with pytest.raises(ConfigError, match='input_fn returned'):
        track(Oracle(), VOLUME, [[2., 2, 2]], 0.5, 5, lambda c: torch.zeros(len(c), 4))
    with pytest.raises(ConfigError, match='mask has shape'):
        track(Oracle(), VOLUME, [[2., 2, 2]], 0.5, 5, constant_field([1., 0, 0]), mask=np.ones((3, 3, 3), bool))
    with pytest.raises(ConfigError, match='initial directions'):
        track(Oracle(), VOLUME, [[2., 2, 2]], 0.5, 5, constant_field([1., 0, 0]), initial_directions=np.ones((2, 3)))


@pytest.mark.slow
def test_a_model_trained_on_straight_lines_tracks_a_straight_line():
    torch.manual_seed(0)
    rng = np.random.default_rng(8)
    model = DirectionGetterModel(16, hidden_size=32)
    # Lines as long as the tracked ones (a recurrent state drifts beyond the lengths it was trained
    # on), with noisy points: the previous direction is then not the fiber's, and the model learns
    # to steer back to what the features say instead of only continuing the way it came.
    train(model, lambda step: curve_batch(rng, nb_points=42, straight_ratio=1.0, point_noise=0.1), 150)
    direction = np.array([1., 2., 0.5]) / np.linalg.norm([1., 2., 0.5])
    features = torch.tensor(odf(direction[None]))
    seeds = np.array([[1.5, 1.5, 1.5], [2.0, 1.0, 2.0]])

    def deviation(model):
        tracked = track(model, np.zeros((40, 40, 40, 1)), seeds, 0.5, 40, lambda coords: features.expand(len(coords), 16),
                        initial_directions=np.tile(direction, (2, 1)))
        offsets = tracked.data - np.repeat(seeds, tracked.lengths, axis=0)
        along = offsets @ direction
        return tracked.lengths.tolist(), np.linalg.norm(offsets - np.outer(along, direction), axis=1).max(), along

    lengths, max_distance, along = deviation(model)
    assert lengths == [41, 41]
    assert max_distance < 2.5 and along.max() > 0.95 * 40 * 0.5, (max_distance, along.max())
    torch.manual_seed(1)
    lengths, untrained_distance, _ = deviation(DirectionGetterModel(16, hidden_size=32))
    assert untrained_distance > 2 * max_distance or min(lengths) < 20


# ---------------------------------------------------------------- the whole pipeline on the demo phantom
def test_demo_phantom_through_the_real_pipeline_learns_and_tracks(tmp_path):
    """HDF5 -> dataset -> sampler (neighborhood, noise) -> DataLoader worker -> model -> tracking."""
    data = pytest.importorskip('dwiml_nb.data')
    import nibabel as nib
    from torch.utils.data import DataLoader
    from dwiml_nb.dataset import MultiSubjectDataset
    from dwiml_nb.interpolation import interpolate_with_neighborhood, neighborhood_offsets
    from dwiml_nb.sampler import BatchStreamlinesSamplerOneInput

    data.make_demo_dataset(tmp_path, which='phantom', nb_subjects=3, progress=False)
    dataset = MultiSubjectDataset(tmp_path / 'phantom.hdf5').load_data()
    neighborhood = dict(neighborhood_type='axes', neighborhood_radius=1)
    training = BatchStreamlinesSamplerOneInput(dataset.training_set, 'streamlines', 'input', batch_size=16,
                                               noise_gaussian_size=0.1, seed=0, **neighborhood)
    validation = BatchStreamlinesSamplerOneInput(dataset.validation_set, 'streamlines', 'input', batch_size=64,
                                                 seed=0, **neighborhood)
    nb_features = dataset.nb_features['input'] * 7
    torch.manual_seed(0)
    model = DirectionGetterModel(nb_features, hidden_size=32)

    def validation_error():
        model.eval()
        errors, n = 0., 0
        with torch.no_grad():
            for parts in validation:
                batch = validation.load_batch(parts)
                streams = batch.streamlines_as_tensors()
                target = direction_targets(streams)
                errors += angular_error_degrees(model(batch.inputs_per_streamline(), streams), target).item() * len(target)
                n += len(target)
        return errors / n

    untrained = validation_error()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(3):
        training.set_epoch(epoch)
        loader = DataLoader(dataset.training_set, batch_sampler=training, collate_fn=training.load_batch,
                            num_workers=1)
        for batch in loader:
            model.train()
            optimizer.zero_grad()
            loss, n = compute_loss_on_batch(model, batch, 'cpu')
            assert n == batch.nb_points - len(batch)
            loss.backward()
            optimizer.step()
    trained = validation_error()
    assert trained < 30 and trained < untrained / 2, (untrained, trained)

    # Track the validation subject from its streamlines' first points, in its white-matter mask.
    volume = dataset.validation_set.get_volume(0, 'input')
    offsets = neighborhood_offsets('axes', 1)
    subject = dataset.validation_set.subjects[0]
    mask = nib.load(tmp_path / 'phantom' / subject / 'wm_mask.nii.gz').get_fdata() > 0
    streams = dataset.validation_set.get_streamlines(0, 'streamlines', np.arange(0, 300, 10))
    seeds = np.stack([s[0] for s in streams])
    first_dirs = np.stack([s[1] - s[0] for s in streams])

    def mean_length(model):
        tracked = track(model, volume, seeds, 0.5, 60, lambda c: interpolate_with_neighborhood(volume, c, offsets),
                        initial_directions=first_dirs, mask=mask)
        assert len(tracked) == len(seeds)
        np.testing.assert_allclose(tracked.data[tracked.offsets], seeds, atol=1e-6)
        return tracked.lengths.mean()

    torch.manual_seed(1)
    assert mean_length(model) > 2 * mean_length(DirectionGetterModel(nb_features, hidden_size=32))


def test_both_directions_from_the_models_own_first_direction_and_default_input_fn():
    # A volume whose features are the x axis everywhere, read by the default input_fn (trilinear).
    volume = np.zeros((20, 20, 6, 3), np.float32)
    volume[..., 0] = 1
    tracked = track(Oracle(), volume, [[2.25, 5.5, 2.5]], 0.5, 100, both_directions=True)
    assert tracked.lengths.tolist() == [40]
    xs = tracked[0][:, 0]
    np.testing.assert_allclose(np.abs(np.diff(xs)), 0.5, atol=1e-5)
    assert np.isin(np.float32(2.25), xs) and {xs[0], xs[-1]} == {np.float32(0.25), np.float32(19.75)}
