"""Tests of dwiml_nb.lstm_cpu: the packed LSTM kernel against nn.LSTM run on each sequence alone in
float64 (outputs and every gradient), its layout against PyTorch's own packing, NaN propagation, the
paths it refuses, and a fresh process (the kernels' on-disk cache) giving the same numbers."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from dwiml_nb import lstm_cpu
from dwiml_nb.core import ConfigError
from dwiml_nb.lstm_cpu import can_run, packed_layout, run_packed_lstm

needs_sgemm = pytest.mark.skipif(not lstm_cpu.SGEMM_AVAILABLE, reason="this torch build's CPU library has no sgemm_")


def reference_run(rnn, x, lengths, weights):
    """nn.LSTM on each sequence alone (batch of one, no padding), in float64: outputs and gradients
    of (out * weights).sum(), as float32."""
    rnn = copy.deepcopy(rnn).double()
    x = x.detach().double().requires_grad_(True)
    out = torch.cat([rnn(seq[:, None])[0][:, 0] for seq in torch.split(x, list(lengths))])
    grads = torch.autograd.grad((out * weights.double()).sum(), [x, *rnn.parameters()])
    return out.float(), [g.float() for g in grads]


def assert_float32_close(out, grads, ref, ref_grads, names):
    """Within float32 rounding of the float64 reference: outputs to 5e-6, each gradient to 1e-4 of its
    largest magnitude (what nn.LSTM's own float32 run reaches: its errors are of the same size)."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=5e-6)
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1., b.abs().max().item()),
                                   msg=lambda m, name=name: f'{name}: {m}')


def kernel_run(rnn, x, lengths, weights):
    layout = packed_layout(lengths)
    out = run_packed_lstm(rnn, x.index_select(0, layout.source), layout).index_select(0, layout.flat)
    return out, torch.autograd.grad((out * weights).sum(), [x, *rnn.parameters()])


@needs_sgemm
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), hidden=st.integers(1, 33),
       inputs=st.integers(1, 9), layers=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_outputs_and_gradients_equal_nn_lstm_on_each_sequence(lengths, hidden, inputs, layers, seed):
    torch.manual_seed(seed)
    rnn = nn.LSTM(inputs, hidden, num_layers=layers, dropout=0.3 if layers > 1 else 0.).eval()
    for p in rnn.parameters():          # weights large enough to saturate some gates
        p.data.mul_(3.)
    x = torch.randn(sum(lengths), inputs, requires_grad=True)
    weights = torch.randn(sum(lengths), hidden)
    out, grads = kernel_run(rnn, x, lengths, weights)
    assert_float32_close(out, grads, *reference_run(rnn, x, lengths, weights),
                         ['x'] + [n for n, _ in rnn.named_parameters()])


@needs_sgemm
def test_the_demo_model_size_on_two_threads():
    # hidden 64 (the example model's), 100 sequences of demo-like lengths, MKL on 2 threads
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 70, 100)
    torch.manual_seed(0)
    rnn = nn.LSTM(64, 64)
    x = torch.randn(int(lengths.sum()), 64, requires_grad=True)
    weights = torch.randn(int(lengths.sum()), 64)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, grads = kernel_run(rnn, x, lengths, weights)
    finally:
        torch.set_num_threads(saved)
    assert_float32_close(out, grads, *reference_run(rnn, x, lengths, weights),
                         ['x'] + [n for n, _ in rnn.named_parameters()])


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=20))
@settings(max_examples=50, deadline=None)
def test_layout_is_time_major_with_the_longest_sequences_first(lengths):
    seqs = [torch.arange(n) + 100 * i for i, n in enumerate(lengths)]   # value: 100 * sequence + step
    layout = packed_layout(lengths)
    packed = torch.empty(sum(lengths), dtype=torch.int64)
    packed[layout.flat] = torch.cat(seqs)
    assert torch.equal(layout.flat[layout.source], torch.arange(sum(lengths)))
    assert layout.batch_sizes.tolist() == [sum(n > t for n in lengths) for t in range(max(lengths))]
    blocks = torch.split(packed, layout.batch_sizes.tolist())
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])          # stable: ties keep their order
    for t, block in enumerate(blocks):
        assert block.tolist() == [100 * i + t for i in order[:len(block)]]
    first = int(layout.batch_sizes[0])
    assert torch.equal(packed[first:] - 1, packed[layout.previous])          # previous: one step earlier


def test_layout_is_pytorchs_packing():
    lengths = [3, 1, 2, 7, 5, 4]           # distinct: PyTorch's sort is not stable on ties
    seqs = [torch.arange(n) + 100 * i for i, n in enumerate(lengths)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    layout = packed_layout(lengths)
    assert layout.batch_sizes.tolist() == packed.batch_sizes.tolist()
    assert packed.data[layout.flat].tolist() == torch.cat(seqs).tolist()


@needs_sgemm
def test_a_nan_reaches_its_sequence_and_its_gradients_only():
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4)
    lengths = [4, 6, 2]
    x = torch.randn(12, 3)
    x[5] = float('nan')                       # step 1 of the second sequence
    x.requires_grad_(True)
    layout = packed_layout(lengths)
    out = run_packed_lstm(rnn, x.index_select(0, layout.source), layout).index_select(0, layout.flat)
    assert not torch.isnan(out[:4]).any() and not torch.isnan(out[10:]).any()
    assert not torch.isnan(out[4]).any() and torch.isnan(out[5:10]).all()
    out.sum().backward()
    assert torch.isnan(rnn.weight_hh_l0.grad).any()   # the loss is NaN: so must its gradients be


def test_what_cannot_run_is_refused():
    x = torch.randn(5, 3)
    for rnn in (nn.GRU(3, 4), nn.LSTM(3, 4, bidirectional=True), nn.LSTM(3, 4, bias=False),
                nn.LSTM(3, 4, proj_size=2), nn.LSTM(3, 4).double()):
        assert not can_run(rnn, x)
        with pytest.raises(ConfigError, match='unidirectional float32 CPU'):
            run_packed_lstm(rnn, x, packed_layout([5]))
    assert not can_run(nn.LSTM(3, 4), x.double())
    with pytest.raises(ConfigError, match='all >= 1'):
        packed_layout([3, 0])


@needs_sgemm
def test_each_bias_gets_a_gradient_of_its_own():
    # Both biases have the same gradient: one tensor for both would be scaled twice by in-place clipping.
    rnn = nn.LSTM(3, 4)
    run_packed_lstm(rnn, torch.randn(7, 3), packed_layout([5, 2])).sum().backward()
    assert torch.equal(rnn.bias_ih_l0.grad, rnn.bias_hh_l0.grad)
    assert rnn.bias_ih_l0.grad.data_ptr() != rnn.bias_hh_l0.grad.data_ptr()
    before = rnn.bias_ih_l0.grad.clone()
    total = torch.nn.utils.clip_grad_norm_(rnn.parameters(), 1e-3)
    for bias in (rnn.bias_ih_l0, rnn.bias_hh_l0):                       # scaled once each
        torch.testing.assert_close(bias.grad, before * 1e-3 / (total + 1e-6))


@needs_sgemm
def test_a_gradient_of_a_gradient_is_refused_not_wrong():
    rnn = nn.LSTM(3, 4)
    x = torch.randn(5, 3, requires_grad=True)
    out = run_packed_lstm(rnn, x, packed_layout([5]))
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable|does not require grad'):
        grad.sum().backward()


def test_without_sgemm_nothing_runs_the_kernel(monkeypatch):
    monkeypatch.setattr(lstm_cpu, 'SGEMM_AVAILABLE', False)
    assert not can_run(nn.LSTM(3, 4), torch.randn(2, 3))


@needs_sgemm
def test_a_fresh_process_computes_the_same(tmp_path):
    # The kernels come from numba's on-disk cache in a second process: same outputs, bit for bit.
    script = tmp_path / 'run.py'
    script.write_text(
        'import sys, torch\n'
        'from dwiml_nb.lstm_cpu import packed_layout, run_packed_lstm\n'
        'torch.manual_seed(0)\n'
        'rnn = torch.nn.LSTM(5, 7, num_layers=2)\n'
        'layout = packed_layout([9, 4, 1, 6])\n'
        'x = torch.randn(20, 5, requires_grad=True)\n'
        'out = run_packed_lstm(rnn, x, layout)\n'
        'out.pow(2).sum().backward()\n'
        'torch.save((out.detach(), x.grad, rnn.weight_hh_l1.grad), sys.argv[1])\n')
    results = []
    for run in range(2):
        path = tmp_path / f'out{run}.pt'
        subprocess.run([sys.executable, str(script), str(path)], check=True)
        results.append(torch.load(path))
    for a, b in zip(*results):
        assert torch.equal(a, b)
