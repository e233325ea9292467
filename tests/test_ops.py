"""The registered operators on their own: against fusedrnn.reference, gradcheck, opcheck,
argument errors, double backward, and what happens on a second backward or when a backward op
is differentiated directly."""

import ctypes

import pytest
import torch

import fusedrnn
from conftest import DEVICES
from engine_helpers import ISAS, engine_isa
from fusedrnn import reference

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))

OPS = torch.ops.fusedrnn
GATES = {"lstm": 4, "lstm_proj": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
I, H, P = 3, 4, 2
# Ragged batch sorted by decreasing length (lengths 4, 3, 1): per-step batch sizes.
RAGGED = torch.tensor([3, 2, 2, 1])
UNIFORM = torch.tensor([3, 3, 3])


def make_args(cell, batch_sizes, dtype=torch.float64, bias=True, requires_grad=False, device="cpu"):
    """Arguments of the forward op of `cell`, fresh random values (batch_sizes stays on the CPU)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)

    n, b = int(batch_sizes.sum()), int(batch_sizes[0])
    gh = GATES[cell] * H
    state = P if cell == "lstm_proj" else H
    x, h0 = rand(n, I), rand(b, state)
    w_ih, w_hh = rand(gh, I) * 0.5, rand(gh, state) * 0.5
    w_ih, w_hh = w_ih.detach().requires_grad_(requires_grad), w_hh.detach().requires_grad_(requires_grad)
    b_ih, b_hh = (rand(gh), rand(gh)) if bias else (None, None)
    if cell.startswith("lstm"):
        w_hr = rand(P, H) if cell == "lstm_proj" else None
        return OPS.lstm_forward, [x, h0, rand(b, H), w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes]
    op = {"gru": OPS.gru_forward, "rnn_tanh": OPS.rnn_tanh_forward, "rnn_relu": OPS.rnn_relu_forward}[cell]
    return op, [x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes]


def reference_forward(cell, args, reverse):
    if cell.startswith("lstm"):
        return reference.lstm_layer(*args, reverse)
    if cell == "gru":
        return reference.gru_layer(*args, reverse)
    return reference.rnn_layer(cell.split("_")[1], *args, reverse)


CASES = [(c, bs, rev) for c in GATES for bs in ("ragged", "uniform") for rev in (False, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,sizes,reverse", CASES)
def test_forward_and_backward_match_reference(cell, sizes, reverse, device):
    batch_sizes = RAGGED if sizes == "ragged" else UNIFORM
    op, args = make_args(cell, batch_sizes, requires_grad=True, device=device)
    outs = op(*args, reverse)
    main = outs[:3] if cell.startswith("lstm") else outs[:2]
    expected = reference_forward(cell, args, reverse)
    for a, e in zip(main, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
    weights = [torch.randn_like(t) for t in main]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(main, weights)), leaves)
    want = torch.autograd.grad(sum((t * w).sum() for t, w in zip(expected, weights)), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,sizes,reverse", CASES)
def test_gradcheck(cell, sizes, reverse, device):
    batch_sizes = RAGGED if sizes == "ragged" else UNIFORM
    op, args = make_args(cell, batch_sizes, requires_grad=True, device=device)
    n_main = 3 if cell.startswith("lstm") else 2

    def fn(*a):
        return op(*a, batch_sizes, reverse)[:n_main]

    assert torch.autograd.gradcheck(fn, args[:-1], eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward_op(cell, bias, device):
    op, args = make_args(cell, RAGGED, bias=bias, requires_grad=True, device=device)
    torch.library.opcheck(op, (*args, True))


def backward_args(cell, args, outs, grads, reverse, need_grad_input):
    """The backward op of `cell` and its arguments (without need_grad_h0) for forward outputs `outs`."""
    if cell.startswith("lstm"):
        x, h0, c0, w_ih, w_hh, _, _, w_hr, bs = args
        return OPS.lstm_backward, (*grads, x, h0, c0, w_ih, w_hh, w_hr, bs, reverse, need_grad_input, outs[0],
                                   outs[3], outs[4])
    x, h0, w_ih, w_hh, _, _, bs = args
    saved = (outs[0], outs[2], outs[3]) if cell == "gru" else (outs[0],)
    backward = {"gru": OPS.gru_backward, "rnn_tanh": OPS.rnn_tanh_backward, "rnn_relu": OPS.rnn_relu_backward}[cell]
    return backward, (*grads, x, h0, w_ih, w_hh, bs, reverse, need_grad_input, *saved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("need_grad_input", [True, False])
@pytest.mark.parametrize("need_grad_h0", [True, False])
def test_opcheck_backward_op(cell, device, need_grad_input, need_grad_h0):
    op, args = make_args(cell, RAGGED, device=device)
    outs = op(*args, False)
    grads = [torch.randn_like(t) for t in outs[: 3 if cell.startswith("lstm") else 2]]
    backward, bargs = backward_args(cell, args, outs, grads, False, need_grad_input)
    torch.library.opcheck(backward, (*bargs, need_grad_h0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,sizes,reverse", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("small", ["0", "1"])
def test_backward_without_grad_h0_skips_only_grad_h0(cell, sizes, reverse, dtype, small, device, monkeypatch):
    """need_grad_h0=False: grad_h0 comes back empty and every other gradient is bitwise the one of
    need_grad_h0=True (the skipped product feeds only dh0), on the engine (float32, packed and small
    paths) and the per-step loop (float64), ragged and uniform, both directions."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", small)
    batch_sizes = RAGGED if sizes == "ragged" else UNIFORM
    op, args = make_args(cell, batch_sizes, dtype=dtype, device=device)
    outs = op(*args, reverse)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=g, dtype=dtype).to(device)
             for t in outs[: 3 if cell.startswith("lstm") else 2]]
    backward, bargs = backward_args(cell, args, outs, grads, reverse, True)
    full = backward(*bargs)  # the schema's default: need_grad_h0=True
    explicit = backward(*bargs, True)
    partial = backward(*bargs, False)
    assert partial[1].numel() == 0
    for i, (a, b) in enumerate(zip(full, explicit)):
        assert torch.equal(a, b), i
    for i, (a, b) in enumerate(zip(full, partial)):
        if i != 1:
            assert torch.equal(a, b), i
    # And grad_h0 itself, when asked for, is the reference's.
    ref_args = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args]
    expected = reference_forward(cell, ref_args, reverse)
    main = expected[:3] if cell.startswith("lstm") else expected[:2]
    want_h0 = torch.autograd.grad(sum((t * w).sum() for t, w in zip(main, grads)), ref_args[1])[0]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(full[1], want_h0, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,sizes,reverse", CASES)
def test_gradgradcheck(cell, sizes, reverse, device):
    """Double backward through the forward ops (fusedrnn/_ops.py: _FirstOrderGrads)."""
    batch_sizes = RAGGED if sizes == "ragged" else UNIFORM
    op, args = make_args(cell, batch_sizes, requires_grad=True, device=device)
    n_main = 3 if cell.startswith("lstm") else 2

    def fn(*a):
        return op(*a, batch_sizes, reverse)[:n_main]

    assert torch.autograd.gradgradcheck(fn, args[:-1], eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("bias", [True, False])
def test_double_backward_matches_reference(cell, bias, device):
    """Gradient of the squared first gradients, every argument, against fusedrnn.reference (float64)."""
    op, args = make_args(cell, RAGGED, bias=bias, requires_grad=True, device=device)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    results = []
    for main in (op(*args, True)[: 3 if cell.startswith("lstm") else 2], reference_forward(cell, args, True)):
        loss = sum((t.sin() * (k + 1)).sum() for k, t in enumerate(main))
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        results.append(torch.autograd.grad(sum(g.square().sum() for g in first), leaves))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_differentiating_a_backward_op_directly_raises():
    """The backward ops' derivative is not implemented (their saved forward outputs are caches):
    differentiating one called directly says so instead of returning zeros."""
    op, args = make_args("gru", RAGGED)
    outs = op(*args, False)
    x, h0, w_ih, w_hh, _, _, bs = args
    grad_out = torch.randn_like(outs[0]).requires_grad_()
    grads = OPS.gru_backward(grad_out, torch.zeros_like(h0), x, h0, w_ih, w_hh, bs, False, True, outs[0], outs[2],
                             outs[3])
    with pytest.raises(RuntimeError, match="differentiating the backward op itself is not supported"):
        grads[2].sum().backward()


def test_second_backward_through_freed_graph_raises():
    op, args = make_args("lstm", RAGGED, requires_grad=True)
    out = op(*args, False)[0]
    loss = out.sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def _bad(cell, **changes):
    op, args = make_args(cell, RAGGED)
    names = {"lstm": ["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "batch_sizes"],
             "gru": ["input", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "batch_sizes"]}[cell]
    for k, v in changes.items():
        args[names.index(k)] = v
    return op, args


BAD = [
    ("gru", {"input": torch.randn(6, 5, dtype=torch.float64)}, r"w_ih must have shape \[12, 5\]"),
    ("gru", {"input": torch.randn(6, 3, 1, dtype=torch.float64)}, "input must be 2-D"),
    ("gru", {"input": torch.ones(6, 3, dtype=torch.int64)}, "input must be float32, float64"),
    ("gru", {"h0": torch.randn(3, 7, dtype=torch.float64)}, r"h0 must have shape \[3, 4\]"),
    ("gru", {"h0": torch.randn(3, 4, dtype=torch.float32)}, "h0 must have the dtype of input"),
    ("gru", {"h0": torch.randn(3, 4, dtype=torch.float64, device="meta")}, "h0 must be on the device of input"),
    ("gru", {"b_ih": torch.randn(5, dtype=torch.float64)}, r"b_ih must have shape \[12\]"),
    ("gru", {"batch_sizes": torch.tensor([3, 2, 2, 2])}, "must sum to the number of rows of input"),
    ("gru", {"batch_sizes": torch.tensor([3, 1, 2, 2])}, "must be non-increasing"),
    ("gru", {"batch_sizes": torch.tensor([3, 0, 2, 3])}, "must be non-increasing, positive"),
    ("gru", {"batch_sizes": torch.tensor([2, 2, 2, 2])}, r"batch_sizes\[0\] must equal the batch size"),
    ("gru", {"batch_sizes": torch.tensor([3.0, 2, 2, 1])}, "batch_sizes must be int64"),
    ("lstm", {"c0": torch.randn(2, 4, dtype=torch.float64)}, r"c0 must have shape \[3, 4\]"),
    ("lstm", {"w_hr": torch.randn(4, 4, dtype=torch.float64)}, "0 < proj_size < hidden_size"),
]


@pytest.mark.parametrize("cell,changes,message", BAD)
def test_bad_arguments_raise_clear_errors(cell, changes, message):
    op, args = _bad(cell, **changes)
    with pytest.raises(RuntimeError, match=message):
        op(*args, False)


def test_backward_op_checks_saved_tensor_shapes():
    op, args = make_args("gru", RAGGED)
    out, h, gates, hn = op(*args, False)
    x, h0, w_ih, w_hh, _, _, bs = args
    with pytest.raises(RuntimeError, match=r"fusedrnn.gru_backward: gates must have shape \[8, 12\]"):
        OPS.gru_backward(out, h, x, h0, w_ih, w_hh, bs, False, True, out, gates[:5], hn)


@pytest.mark.parametrize("cell", list(GATES))
def test_input_gradient_skipped_when_not_needed_and_others_unchanged(cell):
    """A layer fed data that needs no gradient skips the dX GEMM; the weight and state
    gradients are the same as when dX is computed."""
    op, args = make_args(cell, RAGGED, requires_grad=True)
    n_main = 3 if cell.startswith("lstm") else 2

    def grads(input_requires_grad):
        a = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in args]
        a[0].requires_grad_(input_requires_grad)
        outs = op(*a, False)[:n_main]
        leaves = [t for t in a[1:-1] if isinstance(t, torch.Tensor) and t.requires_grad]
        return torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(outs)), leaves)

    for with_dx, without_dx in zip(grads(True), grads(False)):
        assert torch.equal(with_dx, without_dx)


# ---- full-length batches as the modules hold them: input [T, B, I], states [1, B, *] -----------------
# (csrc/ops.cpp): the same numbers as the row form, in the shapes given; what does not fit raises.

def _as_full_batch(cell, args):
    """args of make_args(cell, UNIFORM) with input [T, B, I] and the states [1, B, *]."""
    a = list(args)
    steps, batch = len(UNIFORM), int(UNIFORM[0])
    a[0] = a[0].reshape(steps, batch, I)
    for k in (1, 2) if cell.startswith("lstm") else (1,):
        a[k] = a[k].unsqueeze(0)
    return a


def _inference_op(cell):
    return {"lstm": OPS.lstm_inference, "lstm_proj": OPS.lstm_inference, "gru": OPS.gru_inference}.get(cell)


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_batch_shapes_give_the_row_results(cell, reverse, dtype):
    op, args = make_args(cell, UNIFORM, dtype=dtype)
    full = _as_full_batch(cell, args)
    steps, batch = len(UNIFORM), int(UNIFORM[0])
    n_states = 2 if cell.startswith("lstm") else 1
    rows = op(*args, reverse)
    got = op(*full, reverse)
    assert got[0].shape == (steps, batch, rows[0].shape[1])
    assert torch.equal(got[0].reshape(rows[0].shape), rows[0])
    for k in range(1, 1 + n_states):
        assert got[k].shape == (1,) + tuple(rows[k].shape)
        assert torch.equal(got[k][0], rows[k])
    for k in range(1 + n_states, len(rows)):  # saved for backward: rows either way
        assert torch.equal(got[k], rows[k])
    # Against the reference, independently of the row form.
    expected = reference_forward(cell, args, reverse)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0].reshape(expected[0].shape), expected[0], **tol)
    inference = _inference_op(cell)
    if inference is not None:
        inf = inference(*full, reverse)
        for a, b in zip(inf, got):
            assert torch.equal(a, b)
    # Only one of the two in full-batch form: the other keeps its own shape.
    mixed = list(args)
    mixed[0] = full[0]
    got_mixed = op(*mixed, reverse)
    assert got_mixed[0].shape == got[0].shape and got_mixed[1].shape == rows[1].shape
    assert torch.equal(got_mixed[1], rows[1])


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("need_grad_input", [True, False])
@pytest.mark.parametrize("need_grad_h0", [True, False])
def test_full_batch_backward_gives_the_row_gradients(cell, need_grad_input, need_grad_h0):
    op, args = make_args(cell, UNIFORM)
    full = _as_full_batch(cell, args)
    n_main = 3 if cell.startswith("lstm") else 2
    rows_out = op(*args, False)
    full_out = op(*full, False)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in rows_out[:n_main]]
    full_grads = [grads[0].reshape(full_out[0].shape)] + [t.unsqueeze(0) for t in grads[1:]]
    backward, bargs = backward_args(cell, args, rows_out, grads, False, need_grad_input)
    _, fargs = backward_args(cell, full, full_out, full_grads, False, need_grad_input)
    want = backward(*bargs, need_grad_h0)
    got = backward(*fargs, need_grad_h0)
    n_states = 2 if cell.startswith("lstm") else 1
    for k, (a, b) in enumerate(zip(got, want)):
        if k == 0 and need_grad_input:
            assert a.shape == full[0].shape
            a = a.reshape(b.shape)
        elif 1 <= k <= n_states and b.numel() > 0:
            assert a.shape == (1,) + tuple(b.shape)
            a = a[0]
        assert a.shape == b.shape and torch.equal(a, b), k
    torch.library.opcheck(backward, (*fargs, need_grad_h0))


@pytest.mark.parametrize("cell", list(GATES))
def test_full_batch_autograd_and_opcheck(cell):
    """Through the op's registered autograd (and its fake kernel): gradients and double backward of the
    full-batch form against fusedrnn.reference in float64, and opcheck's checks of the fake shapes."""
    op, args = make_args(cell, UNIFORM, requires_grad=True)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    full = [f.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else f
            for a, f in zip(args, _as_full_batch(cell, detached))]
    torch.library.opcheck(op, (*full, False))
    n_main = 3 if cell.startswith("lstm") else 2
    outs = op(*full, False)[:n_main]
    expected = reference_forward(cell, args, False)
    leaves_full = [t for t in full if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves_ref = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]

    def loss(main):
        return sum(((k + 1) * o.reshape(-1) ** 2).sum() for k, o in enumerate(main))

    got = torch.autograd.grad(loss(outs), leaves_full, create_graph=True)
    want = torch.autograd.grad(loss(expected), leaves_ref, create_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=0, atol=1e-10)
    got2 = torch.autograd.grad(sum(g.square().sum() for g in got), leaves_full)
    want2 = torch.autograd.grad(sum(g.square().sum() for g in want), leaves_ref)
    for a, b in zip(got2, want2):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-9, atol=1e-9)


FULL_BAD = [
    ("gru", {"input": torch.randn(4, 2, 3, dtype=torch.float64)}, "full-length batch"),  # batch 2, h0's 3
    ("gru", {"input": torch.randn(2, 3, 3, dtype=torch.float64)}, "full-length batch"),  # 2 steps, 3 in batch_sizes
    ("gru", {"h0": torch.randn(2, 3, 4, dtype=torch.float64)}, r"h0 must be 3-D \[1, batch, \*\]"),
    ("lstm", {"c0": torch.randn(1, 3, 4, dtype=torch.float64)}, "c0 must have the rank of h0"),
]


@pytest.mark.parametrize("cell,changes,message", FULL_BAD)
def test_full_batch_shapes_that_do_not_fit_raise(cell, changes, message):
    op, args = make_args(cell, UNIFORM)
    names = {"lstm": ["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "batch_sizes"],
             "gru": ["input", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "batch_sizes"]}[cell]
    for k, v in changes.items():
        args[names.index(k)] = v
    with pytest.raises(RuntimeError, match=message):
        op(*args, False)
    # A ragged batch cannot be given as [T, B, I].
    op, args = make_args("gru", RAGGED)
    with pytest.raises(RuntimeError, match="full-length batch"):
        op(torch.randn(4, 2, 3, dtype=torch.float64), *args[1:], False)


def test_full_batch_backward_checks_shapes():
    op, args = make_args("rnn_tanh", UNIFORM)
    full = _as_full_batch("rnn_tanh", args)
    out, h = op(*full, False)
    x, h0, w_ih, w_hh, _, _, bs = full
    with pytest.raises(RuntimeError, match=r"grad_output must be 3-D \[3, 3, \*\] like input"):
        OPS.rnn_tanh_backward(out.reshape(9, 4), h, x, h0, w_ih, w_hh, bs, False, True, out)
    with pytest.raises(RuntimeError, match=r"grad_h_n must be 3-D \[1, batch, \*\] like h0"):
        OPS.rnn_tanh_backward(out, h[0], x, h0, w_ih, w_hh, bs, False, True, out)


# ---- the small path's unit split (csrc/cpu/engine_forward.h: small_forward_split) ----------------

SPLIT_I, SPLIT_H = 24, 40  # H = 40: LSTM 5 unit blocks of 8 (AVX2), GRU / RNN 3 of 16: uneven parts, a partial block


def _split_args(cell, steps, batch, dtype, hidden=SPLIT_H):
    g = torch.Generator().manual_seed(1)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    gh = GATES[cell] * hidden
    x, h0 = rand(steps * batch, SPLIT_I), rand(batch, hidden)
    w_ih, w_hh = rand(gh, SPLIT_I, scale=0.3), rand(gh, hidden, scale=0.3 * (SPLIT_H / hidden) ** 0.5)
    b_ih, b_hh = rand(gh), rand(gh)
    sizes = torch.full((steps,), batch, dtype=torch.long)
    if cell == "lstm":
        return [OPS.lstm_forward, OPS.lstm_inference], [x, h0, rand(batch, hidden), w_ih, w_hh, b_ih, b_hh, None, sizes]
    ops = {"gru": [OPS.gru_forward, OPS.gru_inference], "rnn_tanh": [OPS.rnn_tanh_forward],
           "rnn_relu": [OPS.rnn_relu_forward]}[cell]
    return ops, [x, h0, w_ih, w_hh, b_ih, b_hh, sizes]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("steps,batch", [(1, 1), (6, 1), (4, 3)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("threads", [2, 3])
def test_small_path_unit_split_gives_the_one_thread_numbers(cell, steps, batch, reverse, threads, monkeypatch):
    """A small call split by hidden units across threads (one barrier per step) computes every unit as
    the unsplit call does: bitwise the same output, states and saved tensors, and the reference's numbers."""
    ops, args = _split_args(cell, steps, batch, torch.float32)
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        results = {}
        for split in ("0", "1"):
            monkeypatch.setenv("FUSEDRNN_CPU_SMALL_SPLIT", split)
            results[split] = [op(*args, reverse) for op in ops]
    finally:
        torch.set_num_threads(before)
    for whole, parts in zip(results["0"], results["1"]):
        for a, b in zip(whole, parts):
            assert torch.equal(a, b)
    expected = reference_forward(cell, [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                        for a in args], reverse)
    for got, want in zip(results["1"][0][:2], expected[:2]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ---- the packed path's unit split (csrc/cpu/engine_forward.h: packed_split_parts) ----------------


def _unit_split_calls():
    lib = ctypes.CDLL(fusedrnn._ops._C.__file__)
    lib.fusedrnn_cpu_unit_split_calls.restype = ctypes.c_int64
    return lib.fusedrnn_cpu_unit_split_calls()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fuse_input", ["0", "1"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("steps,batch,hidden,stop", [(40, 1, SPLIT_H, ""), (12, 5, SPLIT_H, ""), (9, 9, SPLIT_H, ""),
                                                     (7, 3, 200, ""), (5, 4, 128, ""), (1, 2, 96, ""),
                                                     (40, 1, SPLIT_H, "16"), (40, 3, 200, "16")])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_packed_path_unit_split_gives_the_batch_split_numbers(cell, steps, batch, hidden, stop, reverse, threads,
                                                              fuse_input, isa, monkeypatch):
    """A call of few rows on the packed (not small) path, split by hidden units across threads (one
    barrier per step) instead of by rows: bitwise the same output, states and saved tensors as the
    batch split (each row's sums run in the same order in any row block), and the reference's numbers.
    9 rows on 2 threads is past the default's 4 rows per thread: forced. "stopped": the split gives up
    after 16 steps (as on a loaded machine) and the batch split runs the rest from the running state."""
    ops, args = _split_args(cell, steps, batch, torch.float32, hidden)
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "0")
    monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", fuse_input)
    monkeypatch.setenv("FUSEDRNN_CPU_UNIT_SPLIT_TEST_STOP", stop)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        results = {}
        for split in ("0", "1"):
            monkeypatch.setenv("FUSEDRNN_CPU_UNIT_SPLIT", split)
            calls = _unit_split_calls()
            results[split] = [op(*args, reverse) for op in ops]
            assert (_unit_split_calls() - calls == len(ops)) == (split == "1")  # the split really ran, or not
    finally:
        torch.set_num_threads(before)
    for whole, parts in zip(results["0"], results["1"]):
        for a, b in zip(whole, parts):
            assert torch.equal(a, b)
    if cell == "rnn_relu" and steps > 12:
        return  # 40 ReLU steps of these random weights amplify float32 rounding (1% on a few units); the
        # bitwise check above is this test's point, tests/test_cpu_engine.py checks accuracy
    expected = reference_forward(cell, [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                        for a in args], reverse)
    for got, want in zip(results["1"][0][:2], expected[:2]):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads,batch,hidden,splits", [(2, 8, 128, True), (2, 9, 128, False), (2, 1, 128, True),
                                                         (4, 16, 200, True), (4, 17, 200, False),
                                                         (4, 4, 40, True), (4, 4, 100, True)])
def test_packed_path_unit_split_default_rule(threads, batch, hidden, splits, monkeypatch):
    """By default a uniform batch of at most 4 rows per thread splits (a training step's forward and
    backward), a larger one does not, nor one whose unit blocks (forward: a vector of units; backward: two)
    are fewer than the threads (H = 40 on 4 threads: 3 / 2 blocks on AVX-512, none splits; 5 / 3 on AVX2,
    only the forward splits). The governor (which pauses the split after a loss on a busy machine) is off."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "0")
    monkeypatch.delenv("FUSEDRNN_CPU_UNIT_SPLIT", raising=False)
    monkeypatch.setenv("FUSEDRNN_CPU_SPLIT_GOVERNOR", "0")  # 4 threads on a 2-core machine lose: no pause
    torch.manual_seed(0)
    m = fusedrnn.LSTM(SPLIT_I, hidden)
    x = torch.randn(3, batch, SPLIT_I, requires_grad=True)
    vec = 16 if engine_isa() == "avx512" else 8
    blocks, panels = -(-hidden // vec), -(-hidden // (2 * vec))  # forward: a vector of units; backward: two
    expected = [splits and blocks >= threads, splits and panels >= threads]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        calls = _unit_split_calls()
        out, _ = m(x)
        forward = _unit_split_calls() - calls
        out.sum().backward()
        ran = [forward == 1, _unit_split_calls() - calls - forward == 1]
    finally:
        torch.set_num_threads(before)
    assert ran == expected


@pytest.mark.parametrize("value", ["2", "yes", "01", "10"])
def test_unit_split_switch_rejects_other_values(value, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "0")
    monkeypatch.setenv("FUSEDRNN_CPU_UNIT_SPLIT", value)
    ops, args = _split_args("gru", 3, 2, torch.float32)
    with pytest.raises(RuntimeError, match="FUSEDRNN_CPU_UNIT_SPLIT must be 0"):
        ops[0](*args, False)


def test_packed_path_unit_split_keeps_padded_rows_apart(monkeypatch):
    """A packed batch of unequal lengths is never unit-split (it reads h_{t-1} from the previous step's
    output rows, which a shrinking batch does not have for every row): forcing the split leaves the
    numbers those of the batch split."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "0")
    torch.manual_seed(0)
    m = fusedrnn.LSTM(6, 40)
    seqs = [torch.randn(n, 6) for n in (30, 22, 9)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs)
    results = {}
    for split in ("0", "1"):
        monkeypatch.setenv("FUSEDRNN_CPU_UNIT_SPLIT", split)
        with torch.no_grad():
            out, (h, c) = m(packed)
        results[split] = (out.data, h, c)
    for a, b in zip(results["0"], results["1"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("steps,batch,hidden,stop", [(12, 1, SPLIT_H, ""), (9, 5, SPLIT_H, ""), (7, 3, 200, ""),
                                                     (5, 4, 128, ""), (6, 2, 192, ""), (1, 3, 96, ""),
                                                     (40, 2, SPLIT_H, "16"), (40, 3, 200, "16")])
@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unit_split_training_gives_the_batch_split_gradients(cell, steps, batch, hidden, stop, threads, with_hx, isa,
                                                              monkeypatch):
    """A training step of a bidirectional layer of few rows, forward and backward split by hidden units
    (csrc/cpu/engine_backward.h: backward_split): bitwise the batch split's output, states and every
    gradient (input, initial states, weights), with and without a stop part way (as on a loaded machine).
    H 128: whole panels only; 96 and 192: 6 or 12 panels of 16 (AVX2) and 3 or 6 of 32 (AVX-512), uneven
    on 4 threads; one step: the split's last product alone."""
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "0")
    monkeypatch.setenv("FUSEDRNN_CPU_UNIT_SPLIT_TEST_STOP", stop)
    torch.manual_seed(3)
    m = getattr(fusedrnn, cell)(SPLIT_I, hidden, bidirectional=True)
    x = torch.randn(steps, batch, SPLIT_I)
    hx = torch.randn(2, batch, hidden) if with_hx else None
    if hx is not None and cell == "LSTM":
        hx = (hx, torch.randn(2, batch, hidden))
    before = torch.get_num_threads()
    results = {}
    try:
        torch.set_num_threads(threads)
        for split in ("0", "1"):
            monkeypatch.setenv("FUSEDRNN_CPU_UNIT_SPLIT", split)
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            hi = None if hx is None else (tuple(h.clone().requires_grad_() for h in hx) if isinstance(hx, tuple)
                                           else hx.clone().requires_grad_())
            calls = _unit_split_calls()
            out, state = m(xi, hi)
            states = state if isinstance(state, tuple) else (state,)
            (out.square().sum() + sum(s.square().sum() for s in states)).backward()
            # forward and backward of both directions
            assert _unit_split_calls() - calls == (4 if split == "1" else 0)
            grads = [xi.grad] + [p.grad for p in m.parameters()]
            if hi is not None:
                grads += [h.grad for h in (hi if isinstance(hi, tuple) else (hi,))]
            results[split] = [out.detach(), *[s.detach() for s in states], *grads]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results["0"], results["1"]):
        assert torch.equal(a, b)
