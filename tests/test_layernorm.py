"""Layer-normalised LSTM / GRU and zoneout (fusedrnn.layernorm, csrc/layernorm/): the ops against
fusedrnn.reference (float64 to 1e-10), gradcheck and opcheck, the modules against the usual Python loop
of nn.Linear + nn.LayerNorm with the same weights, zoneout's masks and expectation, the module interface
(layers, directions, packing, lengths, hx, unbatched, dtypes), torch.compile and torch.export."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import _layernorm_ops, reference

OPS = torch.ops.fusedrnn
F64 = torch.float64
RAGGED = [4, 4, 3, 1, 1]  # batch_sizes of a packed batch of 4 sequences (lengths 5, 3, 3, 2)

pytestmark = pytest.mark.skipif(not _layernorm_ops.AVAILABLE, reason="fusedrnn._C lacks the layer-norm ops")


def op_args(cell, batch_sizes, hidden=5, input_size=3, bias=True, zoneout=True, dtype=F64, requires_grad=False):
    """Random arguments of ln_<cell>_forward (all but batch_sizes, reverse, eps) and batch_sizes."""
    bs = torch.tensor(batch_sizes)
    n, b, h = int(bs.sum()), batch_sizes[0], hidden
    g = (4 if cell == "lstm" else 3) * h

    def r(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)

    def mask():
        return (torch.rand(n, h) < 0.4).to(dtype) if zoneout else None

    b_ih, b_hh = (r(g), r(g)) if bias else (None, None)
    # Gains away from 0 and of both signs: an LN gradient bug hides where the gain is small.
    gain_x, gain_h = (torch.rand(g, dtype=dtype) + 0.5).requires_grad_(requires_grad), r(g)
    if cell == "lstm":
        args = (r(n, input_size), r(b, h), r(b, h), r(g, input_size), r(g, h), b_ih, b_hh, gain_x, gain_h, r(h),
                r(h) if bias else None, mask(), mask())
    else:
        args = (r(n, input_size), r(b, h), r(g, input_size), r(g, h), b_ih, b_hh, gain_x, gain_h, mask())
    return args, bs


def ops_of(cell):
    if cell == "lstm":
        return OPS.ln_lstm_forward, OPS.ln_lstm_backward, reference.ln_lstm_layer, 3
    return OPS.ln_gru_forward, OPS.ln_gru_backward, reference.ln_gru_layer, 2


# ---- the ops against the oracle ------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch_sizes", [[3, 3, 3, 3], RAGGED], ids=["full", "ragged"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("zoneout", [False, True])
def test_op_matches_reference_float64(cell, reverse, batch_sizes, bias, zoneout):
    forward, _, ref, n_main = ops_of(cell)
    args, bs = op_args(cell, batch_sizes, bias=bias, zoneout=zoneout, requires_grad=True)
    ours = forward(*args, bs, reverse, 1e-5)[:n_main]
    theirs = ref(*args, bs, reverse, 1e-5)
    for a, b in zip(ours, theirs):
        assert not a.isnan().any()
        assert (a - b).abs().max().item() <= 1e-10
    grads = [torch.randn_like(t) for t in theirs]
    leaves = [a for a in args if a is not None and a.requires_grad]
    g_ours = torch.autograd.grad(ours, leaves, grads)
    g_ref = torch.autograd.grad(theirs, leaves, grads)
    for a, b in zip(g_ours, g_ref):
        assert (a - b).abs().max().item() <= 1e-10


# More rows than one block of the backward's gradient buffers (256 rows, csrc/layernorm/layernorm_cpu.cpp
# step_blocks), ragged, so that blocks end inside runs of equal batch sizes and at their changes.
LONG_RAGGED = [20] * 10 + [17] * 10 + [9] * 10 + [3] * 12 + [1] * 5


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_backward_in_step_blocks_matches_reference(cell, reverse, dtype, monkeypatch):
    torch.manual_seed(15)
    forward, _, ref, n_main = ops_of(cell)
    args, bs = op_args(cell, LONG_RAGGED, zoneout=True, requires_grad=True)
    leaves = [a for a in args if a is not None and a.requires_grad]
    theirs = ref(*args, bs, reverse, 1e-5)
    grads = [torch.randn_like(t) for t in theirs]
    g_ref = torch.autograd.grad(theirs, leaves, grads)
    cast = tuple(None if a is None else a.detach().to(dtype).requires_grad_(a.requires_grad) for a in args)
    cast_leaves = [a for a in cast if a is not None and a.requires_grad]
    results = {}
    for blocks in ("steps", "all"):
        if blocks == "all":
            monkeypatch.setenv("FUSEDRNN_LN_BACKWARD_BLOCK", "all")
        ours = forward(*cast, bs, reverse, 1e-5)[:n_main]
        results[blocks] = torch.autograd.grad(ours, cast_leaves, [g.to(dtype) for g in grads])
    tol = 1e-10 if dtype == F64 else 2e-4
    for a, b, c in zip(results["steps"], results["all"], g_ref):
        scale = 1.0 if dtype == F64 else c.abs().max().item() + 1.0
        assert (a.double() - c).abs().max().item() <= tol * scale
        assert (b.double() - c).abs().max().item() <= tol * scale


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(cell, reverse):
    forward, _, _, n_main = ops_of(cell)
    args, bs = op_args(cell, RAGGED, hidden=3, input_size=2, requires_grad=True)

    def fn(*a):
        return forward(*a, bs, reverse, 1e-5)[:n_main]

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradgradcheck(cell):
    """Double backward (create_graph=True) differentiates the reference recomputed from the inputs."""
    forward, _, _, n_main = ops_of(cell)
    args, bs = op_args(cell, [2, 2, 1], hidden=2, input_size=2, zoneout=False, requires_grad=True)

    def fn(*a):
        return forward(*a, bs, False, 1e-5)[:n_main]

    assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("zoneout", [True, False])
def test_opcheck_forward(cell, bias, zoneout):
    forward, _, _, _ = ops_of(cell)
    args, bs = op_args(cell, RAGGED, bias=bias, zoneout=zoneout, dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(forward, (*args, bs, True, 1e-5))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("need_grad_input", [True, False])
def test_opcheck_backward(cell, need_grad_input):
    forward, backward, _, n_main = ops_of(cell)
    args, bs = op_args(cell, RAGGED, dtype=torch.float32)
    outs = forward(*args, bs, False, 1e-5)
    grads = [torch.randn_like(t) for t in outs[:n_main]]
    if cell == "lstm":
        x, h0, c0, w_ih, w_hh, _, _, gx, gh, gc, bc, zh, zc = args
        bargs = (*grads, x, h0, c0, w_ih, w_hh, gx, gh, gc, bc, zh, zc, bs, False, need_grad_input, outs[0],
                 *outs[3:])
    else:
        x, h0, w_ih, w_hh, _, b_hh, gx, gh, zh = args
        bargs = (*grads, x, h0, w_ih, w_hh, b_hh, gx, gh, zh, bs, False, need_grad_input, outs[0], *outs[2:])
    torch.library.opcheck(backward, bargs)


def test_op_checks_arguments():
    args, bs = op_args("lstm", RAGGED)
    with pytest.raises(RuntimeError, match="fusedrnn.ln_lstm_forward: ln_ih_w must have shape"):
        OPS.ln_lstm_forward(*args[:7], args[7][:-1], *args[8:], bs, False, 1e-5)
    with pytest.raises(RuntimeError, match="batch_sizes must sum"):
        OPS.ln_lstm_forward(*args, torch.tensor([4, 4, 3, 1]), False, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        OPS.ln_lstm_forward(*args, bs, False, 0.0)


# ---- the modules against the usual Python loop ----------------------------------------------------

# The usual Python loop of nn.Linear + nn.LayerNorm (the benchmark's baseline, so its numbers are checked here).
from benchmarks.layernorm import LoopLayerNormGRU, LoopLayerNormLSTM  # noqa: E402


def randomise(module):
    """Weights of every parameter random (gains and shifts too: their init, 1 and 0, hides mistakes)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "weight_ln" in name else 0.0))
    return module


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_module_matches_python_loop_of_linear_and_layernorm(cell):
    torch.manual_seed(0)
    T, B, I, H = 6, 3, 4, 5
    if cell == "lstm":
        fused = randomise(fusedrnn.LayerNormLSTM(I, H, dtype=F64))
        loop = LoopLayerNormLSTM(I, H, dtype=F64).load_from(fused, "_l0")
    else:
        fused = randomise(fusedrnn.LayerNormGRU(I, H, dtype=F64))
        loop = LoopLayerNormGRU(I, H, dtype=F64).load_from(fused, "_l0")
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, B, H, dtype=F64)
    if cell == "lstm":
        c0 = torch.randn(1, B, H, dtype=F64)
        out, (h, c) = fused(x, (h0, c0))
        out2, h2, c2 = loop(x, h0[0], c0[0])
        pairs = [(out, out2), (h[0], h2), (c[0], c2)]
    else:
        out, h = fused(x, h0)
        out2, h2 = loop(x, h0[0])
        pairs = [(out, out2), (h[0], h2)]
    for a, b in pairs:
        assert (a - b).abs().max().item() <= 1e-10
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *fused.parameters()], g)
    grads2 = torch.autograd.grad(out2, [x, *loop.parameters()], g)
    by_name = dict(zip(["x"] + [n for n, _ in fused.named_parameters()], grads))
    loop_names = {"ih.weight": "weight_ih_l0", "hh.weight": "weight_hh_l0", "ln_ih.weight": "weight_ln_ih_l0",
                  "ln_ih.bias": "bias_ih_l0", "ln_hh.weight": "weight_ln_hh_l0", "ln_hh.bias": "bias_hh_l0",
                  "ln_c.weight": "weight_ln_c_l0", "ln_c.bias": "bias_ln_c_l0"}
    assert (by_name["x"] - grads2[0]).abs().max().item() <= 1e-10
    for (name, _), g2 in zip(loop.named_parameters(), grads2[1:]):
        assert (by_name[loop_names[name]] - g2).abs().max().item() <= 1e-10, name


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers,bidirectional", [(2, False), (2, True), (1, True)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_stack_matches_python_loops(cell, num_layers, bidirectional, batch_first):
    """Layers x directions: each layer and direction is the usual loop on the previous layer's output."""
    torch.manual_seed(1)
    T, B, I, H = 5, 3, 4, 3
    cls, loop_cls = ((fusedrnn.LayerNormLSTM, LoopLayerNormLSTM) if cell == "lstm"
                     else (fusedrnn.LayerNormGRU, LoopLayerNormGRU))
    fused = randomise(cls(I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                          dtype=F64))
    x = torch.randn(B, T, I, dtype=F64) if batch_first else torch.randn(T, B, I, dtype=F64)
    D = 2 if bidirectional else 1
    h0 = torch.randn(num_layers * D, B, H, dtype=F64)
    c0 = torch.randn(num_layers * D, B, H, dtype=F64)
    if cell == "lstm":
        out, (h, c) = fused(x, (h0, c0))
    else:
        out, h = fused(x, h0)
    layer_in = x.transpose(0, 1) if batch_first else x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            loop = loop_cls(layer_in.shape[-1], H, dtype=F64).load_from(fused, f"_l{layer}" + ("_reverse" if d else ""))
            seq = layer_in.flip(0) if d else layer_in
            if cell == "lstm":
                o, hk, ck = loop(seq, h0[k], c0[k])
                assert (ck - c[k]).abs().max().item() <= 1e-10
            else:
                o, hk = loop(seq, h0[k])
            assert (hk - h[k]).abs().max().item() <= 1e-10
            outs.append(o.flip(0) if d else o)
        layer_in = torch.cat(outs, -1)
    expected = layer_in.transpose(0, 1) if batch_first else layer_in
    assert (out - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("cls", [fusedrnn.LayerNormLSTM, fusedrnn.LayerNormGRU, fusedrnn.LSTM, fusedrnn.GRU,
                                 fusedrnn.RNN])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_lengths_gives_packing_by_hand_bitwise_with_gradients(cls, batch_first, dtype):
    """lengths= gathers the padded rows by one index and scatters the output back (modules._forward_lengths,
    shared by every layer): output, states and every gradient are torch.equal to pack_padded_sequence ->
    the module -> pad_packed_sequence, for ties in the lengths, a sequence as long as the padding and hx."""
    torch.manual_seed(5)
    m = randomise(cls(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, dtype=dtype))
    is_lstm = cls in (fusedrnn.LayerNormLSTM, fusedrnn.LSTM)
    lengths, steps = torch.tensor([3, 6, 1, 3, 4]), 6
    x0 = torch.randn((5, steps, 3) if batch_first else (steps, 5, 3), dtype=dtype)
    states0 = [torch.randn(4, 5, 4, dtype=dtype) for _ in range(2 if is_lstm else 1)]
    weight = torch.randn(5 * steps * 8, dtype=dtype)  # a dense output gradient, different per element
    results = []
    for by_hand in (True, False):
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        states = [s.clone().requires_grad_() for s in states0]
        hx = tuple(states) if is_lstm else states[0]
        if by_hand:
            out, st = m(pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False), hx)
            out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=steps)
        else:
            out, st = m(x, hx, lengths=lengths)
        st = list(st) if is_lstm else [st]
        ((out.reshape(-1) * weight).sum() + sum((s * s).sum() for s in st)).backward()
        results.append([out, *st, x.grad, *(s.grad for s in states), *(p.grad for p in m.parameters())])
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_and_lengths_match_each_sequence_alone(cell):
    torch.manual_seed(2)
    cls = fusedrnn.LayerNormLSTM if cell == "lstm" else fusedrnn.LayerNormGRU
    m = randomise(cls(3, 4, num_layers=2, bidirectional=True, dtype=F64))
    lengths = torch.tensor([2, 5, 3])
    x = torch.randn(5, 3, 3, dtype=F64)
    out_l, state_l = m(x, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_p, state_p = m(packed)
    out_p, _ = pad_packed_sequence(out_p, total_length=5)
    assert (out_l - out_p).abs().max().item() == 0
    for b in range(3):
        alone, state_b = m(x[:lengths[b], b])  # unbatched 2-D input
        assert (out_l[:lengths[b], b] - alone).abs().max().item() <= 1e-10
        assert out_l[lengths[b]:, b].abs().max().item() == 0 if lengths[b] < 5 else True
        h_l = state_l[0] if cell == "lstm" else state_l
        h_b = state_b[0] if cell == "lstm" else state_b
        assert (h_l[:, b] - h_b).abs().max().item() <= 1e-10


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_is_one_step_of_the_layer(cell):
    torch.manual_seed(3)
    if cell == "lstm":
        layer, c = randomise(fusedrnn.LayerNormLSTM(3, 4, dtype=F64)), fusedrnn.LayerNormLSTMCell(3, 4, dtype=F64)
    else:
        layer, c = randomise(fusedrnn.LayerNormGRU(3, 4, dtype=F64)), fusedrnn.LayerNormGRUCell(3, 4, dtype=F64)
    with torch.no_grad():
        for name, p in c.named_parameters():
            p.copy_(getattr(layer, name + "_l0"))
    x, h0, c0 = torch.randn(2, 3, dtype=F64), torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    if cell == "lstm":
        h1, c1 = c(x, (h0, c0))
        _, (h, cc) = layer(x[None], (h0[None], c0[None]))
        assert (c1 - cc[0]).abs().max().item() <= 1e-10
        hu, _ = c(x[0], (h0[0], c0[0]))  # unbatched
    else:
        h1 = c(x, h0)
        _, h = layer(x[None], h0[None])
        hu = c(x[0], h0[0])
    assert (h1 - h[0]).abs().max().item() <= 1e-10
    assert (hu - h1[0]).abs().max().item() <= 1e-10


# ---- zoneout ----------------------------------------------------------------------------------------

def drawn_mask(rows, hidden, p):
    """A training mask as fusedrnn.layernorm documents its draw, written out independently: 64-bit words
    uniform over every bit pattern from torch's generator, each read as four signed 16-bit integers s
    (little-endian, two's complement) in [-2**15, 2**15), a unit kept where s + 2**15 < round(p * 2**16)."""
    n = rows * hidden
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)
    fields = [(words >> (16 * k)) & 0xFFFF for k in range(4)]  # the k-th 16 bits of each word
    bits = torch.stack(fields, dim=1).reshape(-1)[:n].reshape(rows, hidden)
    signed = torch.where(bits >= 2**15, bits - 2**16, bits)
    return signed + 2**15 < round(p * 2**16)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zoneout_training_uses_fresh_bernoulli_masks_reproducibly(cell):
    T, B, I, H, p = 6, 4, 3, 5, 0.3
    m = randomise(fusedrnn.LayerNormLSTM(I, H, zoneout=p, dtype=F64) if cell == "lstm"
                  else fusedrnn.LayerNormGRU(I, H, zoneout=p, dtype=F64))
    x = torch.randn(T, B, I, dtype=F64)
    torch.manual_seed(7)
    out1 = m(x)[0]
    torch.manual_seed(7)
    out2 = m(x)[0]
    assert torch.equal(out1, out2)
    out3 = m(x)[0]
    assert not torch.equal(out1, out3)
    # The same masks drawn by hand, in the module's order (h's, then c's, per layer and direction),
    # through the oracle.
    torch.manual_seed(7)
    zh = drawn_mask(T * B, H, p).to(F64)
    zc = drawn_mask(T * B, H, p).to(F64) if cell == "lstm" else None
    assert zh.reshape(T, B, H).std(0).sum() > 0  # a fresh mask per step, not one for the sequence
    bs = torch.full((T,), B)
    w = [getattr(m, n + "_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ln_ih",
                                          "weight_ln_hh")]
    h0 = torch.zeros(B, H, dtype=F64)
    if cell == "lstm":
        ref, _, _ = reference.ln_lstm_layer(x.reshape(T * B, I), h0, h0, *w, m.weight_ln_c_l0, m.bias_ln_c_l0, zh, zc,
                                            bs, False)
    else:
        ref, _ = reference.ln_gru_layer(x.reshape(T * B, I), h0, *w, zh, bs, False)
    assert (out1.reshape(T * B, H) - ref).abs().max().item() <= 1e-10


@pytest.mark.parametrize("p", [0.05, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_zoneout_mask_statistics(p, dtype):
    """The masks are Bernoulli(p) per unit: their rate, the rate of each of the four units a 64-bit word
    serves (the word's top field holds its sign bit), and no correlation between neighbouring units or
    between consecutive steps' masks."""
    rows, hidden = 4000, 64  # 256000 units: the rate's standard deviation is <= 0.001
    torch.manual_seed(1)
    mask = fusedrnn.layernorm.zoneout_weights(p, rows, hidden, torch.empty(0, dtype=dtype), True)
    assert mask.dtype == dtype and mask.shape == (rows, hidden)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    m = mask.double()
    sd = (p * (1 - p) / m.numel()) ** 0.5
    assert abs(m.mean().item() - p) < 5 * sd
    for lane in range(4):
        assert abs(m[:, lane::4].mean().item() - p) < 5 * 2 * sd
    centred = m - p
    var = p * (1 - p)
    assert abs((centred[:, 1:] * centred[:, :-1]).mean().item() / var) < 0.02  # neighbouring units
    assert abs((centred[1:] * centred[:-1]).mean().item() / var) < 0.02  # consecutive rows (steps)
    torch.manual_seed(1)
    assert torch.equal(mask.bool(), drawn_mask(rows, hidden, p))


def test_zoneout_mask_edge_probabilities():
    assert fusedrnn.layernorm.zoneout_weights(0.0, 3, 4, torch.empty(0), True) is None
    assert torch.equal(fusedrnn.layernorm.zoneout_weights(1.0, 3, 4, torch.empty(0), True), torch.ones(3, 4))
    # Below 2**-17, p rounds to 0 at the masks' 16-bit resolution.
    assert fusedrnn.layernorm.zoneout_weights(1e-6, 30, 40, torch.empty(0), True).sum().item() == 0


def test_zoneout_eval_expectation():
    torch.manual_seed(0)
    m = randomise(fusedrnn.LayerNormLSTM(3, 4, zoneout=(0.2, 0.5), dtype=F64)).eval()
    x = torch.randn(5, 2, 3, dtype=F64)
    out, _ = m(x)
    assert torch.equal(out, m(x)[0])  # eval is deterministic
    w = [getattr(m, n + "_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ln_ih",
                                          "weight_ln_hh", "weight_ln_c", "bias_ln_c")]
    h0 = torch.zeros(2, 4, dtype=F64)
    ref, _, _ = reference.ln_lstm_layer(x.reshape(10, 3), h0, h0, *w, torch.full((10, 4), 0.2, dtype=F64),
                                        torch.full((10, 4), 0.5, dtype=F64), torch.full((5,), 2), False)
    assert (out.reshape(10, 4) - ref).abs().max().item() <= 1e-10


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("env", [{}, {"FUSEDRNN_LN_GEMM": "blas"}], ids=["brgemm", "sgemm"])
def test_zoneout_weights_as_one_expanded_row_equal_the_full_tensor(cell, dtype, reverse, env, monkeypatch):
    """Eval's zoneout argument is one row of p's expanded over the rows (stride 0; the CPU kernels then read
    that row for every row, NOTES entry 37): the forward op's outputs (saved buffers included), the inference
    op's and every gradient bitwise those of the same values as a full [N, H] tensor; the LSTM's h weights
    a row of p's while its c weights are a full mask (each argument read by its own row step)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(14)
    forward, _, _, n_main = ops_of(cell)
    args, bs = op_args(cell, [9, 9, 7, 7, 2], hidden=37, input_size=13, zoneout=True, dtype=dtype,
                       requires_grad=True)
    n = int(bs.sum())
    row = torch.rand(1, 37, dtype=dtype)  # a different p per unit, so that a wrong row offset shows
    expanded, full = row.expand(n, 37), row.expand(n, 37).contiguous()
    assert expanded.stride(0) == 0
    as_row = args[:-2] + (expanded, args[-1]) if cell == "lstm" else args[:-1] + (expanded,)
    as_full = args[:-2] + (full, args[-1]) if cell == "lstm" else args[:-1] + (full,)
    results = []
    for a in (as_row, as_full):
        out = forward(*a, bs, reverse, 1e-5)
        inference = inference_of(cell)(*[t.detach() if isinstance(t, torch.Tensor) else t for t in a], bs,
                                       reverse, 1e-5)
        torch.manual_seed(15)
        grads = [torch.randn_like(o) for o in out[:n_main]]
        leaves = [t for t in a if t is not None and t.requires_grad]
        results.append(list(out) + list(inference) + list(torch.autograd.grad(out[:n_main], leaves, grads)))
    for r, f in zip(*results):
        assert torch.equal(r, f)


def test_zoneout_one_keeps_the_initial_state():
    m = fusedrnn.LayerNormGRU(3, 4, zoneout=1.0)
    h0 = torch.randn(1, 2, 4)
    out, h = m(torch.randn(5, 2, 3), h0)
    assert torch.equal(h, h0) and torch.equal(out[-1], h0[0])


# ---- the interface ----------------------------------------------------------------------------------

def test_parameters_names_and_init():
    torch.manual_seed(0)
    ours = fusedrnn.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    theirs = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    sd = ours.state_dict()
    for name, value in theirs.state_dict().items():
        assert torch.equal(sd[name], value), name  # the same seed gives torch.nn's weights
    extra = sorted(set(sd) - set(theirs.state_dict()))
    assert extra == sorted(f"{w}_l{k}{s}" for w in ("weight_ln_ih", "weight_ln_hh", "weight_ln_c", "bias_ln_c")
                           for k in (0, 1) for s in ("", "_reverse"))
    for name in extra:
        assert torch.equal(sd[name], torch.ones_like(sd[name]) if name.startswith("weight") else
                           torch.zeros_like(sd[name]))
    missing = ours.load_state_dict(theirs.state_dict(), strict=False).missing_keys
    assert sorted(missing) == extra
    gru = fusedrnn.LayerNormGRU(3, 4, bias=False)
    assert [n for n, _ in gru.named_parameters()] == ["weight_ih_l0", "weight_hh_l0", "weight_ln_ih_l0",
                                                       "weight_ln_hh_l0"]
    assert gru.weight_ln_ih_l0.shape == (12,)


def test_bad_arguments_raise_torch_nn_types():
    with pytest.raises(ValueError, match="zoneout"):
        fusedrnn.LayerNormLSTM(3, 4, zoneout=1.5)
    with pytest.raises(ValueError, match="zoneout"):
        fusedrnn.LayerNormGRU(3, 4, zoneout=(0.1, 0.2))
    with pytest.raises(ValueError, match="proj_size"):
        fusedrnn.LayerNormLSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        fusedrnn.LayerNormLSTMCell(3, 4, layer_norm_eps=0)
    m = fusedrnn.LayerNormLSTM(3, 4)
    with pytest.raises(RuntimeError, match="input_size"):
        m(torch.randn(5, 2, 7))
    with pytest.raises(RuntimeError, match="h_0"):
        m(torch.randn(5, 2, 3), (torch.randn(1, 3, 4), torch.randn(1, 2, 4)))
    with pytest.raises(ValueError):
        m(torch.randn(5, 2, 3, 1))
    with pytest.raises(ValueError):
        m(torch.randn(5, 2, 3).double())  # dtype mismatch: nn's ValueError


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_float32_and_bfloat16_close_to_float64(cell):
    torch.manual_seed(4)
    cls = fusedrnn.LayerNormLSTM if cell == "lstm" else fusedrnn.LayerNormGRU
    m64 = randomise(cls(8, 16, num_layers=2, dtype=F64))
    x = torch.randn(10, 4, 8, dtype=F64)
    ref = m64(x)[0]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        m = cls(8, 16, num_layers=2, dtype=dtype)
        m.load_state_dict(m64.state_dict())
        out = m(x.to(dtype))[0]
        assert out.dtype == dtype
        assert (out.double() - ref).abs().max().item() <= tol
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = cls(8, 16, num_layers=2)
        m.load_state_dict(m64.state_dict())
        out = m(x.float())[0]
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max().item() <= 0.1


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("env", [{}, {"FUSEDRNN_LN_GEMM": "blas"}, {"FUSEDRNN_CPU_ISA": "avx2"},
                                 {"FUSEDRNN_LN_SPLIT_K": "0"}], ids=["brgemm", "sgemm", "avx2_rows", "one_k_block"])
def test_float32_op_paths_match_float64(cell, env, monkeypatch):
    """float32's step GEMMs (brgemm per block of rows, the backward's recurrent product in four k chunks or in one;
    or MKL's sgemm per step) and both compiled copies of the row passes (AVX-512 where the CPU has it, the build's
    flags): forward and every gradient of the op against the float64 op, at a size with vector remainders
    (H = 37: k = 148 / 111 in chunks of 37 / 28), ragged, with zoneout, on every thread."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(11)
    fwd, bwd, _, n_main = ops_of(cell)
    args64, bs = op_args(cell, [9, 9, 7, 7, 2], hidden=37, input_size=13, requires_grad=True)
    args32 = tuple(None if a is None else a.detach().float().requires_grad_(a.requires_grad) for a in args64)
    grads = None
    for args in (args64, args32):
        out = fwd(*args, bs, False, 1e-5)[:n_main]
        if grads is None:
            grads = [torch.randn_like(o) for o in out]
        loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(out, grads))
        inputs = [a for a in args if a is not None and a.requires_grad]
        got = [o.detach() for o in out] + list(torch.autograd.grad(loss, inputs))
        if args is args64:
            expected = got
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
        scale = e.abs().max().item() + 1.0
        assert (g.double() - e).abs().max().item() <= 2e-4 * scale


def _teacher_forced_float32_errors(seed, T=100, B=32, I=100, H=128):
    """float32 errors against float64 (|error| / |float64 value|, 2-norms over the tensor) of the LN-LSTM written
    as the Python loop and of the fused ops, output and every gradient of sum(output * R), at the sentiment shape.

    Each step starts from the float64 trajectory's state rounded to float32, so that what is compared is each
    implementation's own rounding: run free, the float32 trajectory leaves float64's by ~1e-6 a step and the
    recurrence amplifies that ~300-1000x over 100 steps, for both alike, so which one ends closer is a coin
    toss per draw (benchmarks/NOTES.md entry 46: 40 draws, the fused / loop ratio of max errors has a geometric
    mean of 0.88-0.99 per tensor, single draws 0.2-8x). The loop takes the forced states straight through (value
    forced, gradient through its own step); the fused forward op runs one step at a time from them, and its
    backward op runs the whole sequence on those steps' saved buffers, the forced states given as the
    output / cells it reads the previous states from."""
    torch.manual_seed(seed)
    fused = fusedrnn.LayerNormLSTM(I, H)
    x, R = torch.randn(T, B, I), torch.randn(T, B, H)

    def loop_run(dtype, forced=None):
        loop = LoopLayerNormLSTM(I, H, dtype=dtype).load_from(fused)
        xx = x.to(dtype).clone().requires_grad_()
        x_proj = loop.ln_ih(loop.ih(xx)).unbind(0)  # the loop's x_proj[t], its backward without T zero-fills
        h = c = torch.zeros(B, H, dtype=dtype)
        outs, states = [], [(h, c)]
        for t in range(T):
            if forced is not None:
                h = forced[t][0] + (h - h.detach())
                c = forced[t][1] + (c - c.detach())
            i, f, g, o = (x_proj[t] + loop.ln_hh(loop.hh(h))).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(loop.ln_c(c))
            outs.append(h)
            states.append((h.detach(), c.detach()))
        out = torch.stack(outs)
        (out * R.to(dtype)).sum().backward()
        params = (loop.ih.weight, loop.hh.weight, loop.ln_ih.bias, loop.ln_hh.bias, loop.ln_ih.weight,
                  loop.ln_hh.weight, loop.ln_c.weight, loop.ln_c.bias)
        return [out.detach(), xx.grad] + [p.grad for p in params], states

    expected, states64 = loop_run(F64)
    forced = [(h.float(), c.float()) for h, c in states64]
    loop32, _ = loop_run(torch.float32, forced)
    w = [p.detach() for p in (fused.weight_ih_l0, fused.weight_hh_l0, fused.bias_ih_l0, fused.bias_hh_l0,
                              fused.weight_ln_ih_l0, fused.weight_ln_hh_l0, fused.weight_ln_c_l0, fused.bias_ln_c_l0)]
    steps = [OPS.ln_lstm_forward(x[t], *forced[t], *w, None, None, torch.tensor([B]), False, 1e-5) for t in range(T)]
    out, norm_x, norm_h, gates, _, norm_c, rstd = (torch.cat([s[k] for s in steps]) for k in (0, 3, 4, 5, 6, 7, 8))
    next_h, next_c = (torch.cat([state[k] for state in forced[1:]]) for k in (0, 1))
    zero = torch.zeros(B, H)
    g = OPS.ln_lstm_backward(R.reshape(T * B, H), zero, zero, x.reshape(T * B, I), zero, zero, w[0], w[1], w[4],
                             w[5], w[6], w[7], None, None, torch.full((T,), B), False, True, next_h, norm_x, norm_h,
                             gates, next_c, norm_c, rstd)
    fused32 = [out.view(T, B, H), g[0].view(T, B, I), *g[3:11]]

    def error(got, ref):
        return ((got.double() - ref).norm() / ref.norm()).item()

    return [(error(a, e), error(b, e)) for a, b, e in zip(loop32, fused32, expected)]


def test_float32_error_against_float64_at_most_the_python_loops_at_the_sentiment_shape():
    """The fused LN-LSTM's float32 rounding is no worse than the usual Python loop's: teacher-forced (see
    _teacher_forced_float32_errors) at T=100 B=32 I=100 H=128, the output and every gradient (input, W_ih, W_hh,
    both biases, the three gains, LN(c)'s shift), error as |error| / |float64 value| over the whole tensor. Per
    tensor the geometric mean over six draws of the fused / loop ratio is at most 1.35 (measured 0.84-1.15 with
    the backward's recurrent product in four k chunks; 1.12-1.48 with it in one brgemm, FUSEDRNN_LN_SPLIT_K=0,
    NOTES entry 46); single draws spread by ~3x either way, so each is only held below 6."""
    names = ["output", "input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ln_ih", "weight_ln_hh",
             "weight_ln_c", "bias_ln_c"]
    draws = [_teacher_forced_float32_errors(seed) for seed in range(6)]
    for k, name in enumerate(names):
        ratios = torch.tensor([d[k][1] / d[k][0] for d in draws], dtype=F64)
        loop_error = max(d[k][0] for d in draws)
        assert 0 < loop_error < 1e-4, (name, loop_error)  # float32 rounding, not a wrong gradient
        assert ratios.log().mean().exp().item() <= 1.35, (name, ratios.tolist())
        assert ratios.max().item() <= 6.0, (name, ratios.tolist())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_torch_compile_fullgraph_and_export(cell):
    torch._dynamo.reset()
    torch.manual_seed(5)
    cls = fusedrnn.LayerNormLSTM if cell == "lstm" else fusedrnn.LayerNormGRU
    m = randomise(cls(3, 4, num_layers=2, bidirectional=True, batch_first=True))
    x = torch.randn(2, 6, 3, requires_grad=True)
    eager = m(x)[0]
    compiled = torch.compile(m, fullgraph=True)(x)[0]
    torch.testing.assert_close(compiled, eager)
    g_eager = torch.autograd.grad(eager.sum(), x)[0]
    g_comp = torch.autograd.grad(compiled.sum(), x)[0]
    torch.testing.assert_close(g_comp, g_eager)
    batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("steps", min=2)
    ep = torch.export.export(m.eval(), (x.detach(),), dynamic_shapes=({0: batch, 1: steps},))
    x2 = torch.randn(5, 9, 3)
    torch.testing.assert_close(ep.module()(x2)[0], m(x2)[0])
    assert any("ln_" in str(n.target) for n in ep.graph.nodes)


# ---- inference without the saved-for-backward buffers ----------------------------------------------
# ln_lstm_inference / ln_gru_inference: the forward op's main outputs without norm_h [N, G] (a [B, G]
# scratch instead), gates, cells, norm_c and rstd; what the layers run when no gradient can be taken.

def inference_of(cell):
    return OPS.ln_lstm_inference if cell == "lstm" else OPS.ln_gru_inference


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("zoneout", ["mask", "eval", "eval_row", "none"])
@pytest.mark.parametrize("env", [{}, {"FUSEDRNN_LN_GEMM": "blas"}, {"FUSEDRNN_CPU_ISA": "avx2"}],
                         ids=["brgemm", "sgemm", "avx2_rows"])
def test_inference_op_is_bitwise_the_forward(cell, dtype, reverse, zoneout, env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(12)
    forward, _, ref, n_main = ops_of(cell)
    args, bs = op_args(cell, [9, 9, 7, 7, 2], hidden=37, input_size=13, zoneout=zoneout == "mask", dtype=dtype)
    if zoneout.startswith("eval"):  # eval_row: one row of p's expanded over the rows, as the layers pass it
        n = int(bs.sum())
        p = torch.full((n, 37), 0.3, dtype=dtype) if zoneout == "eval" else torch.full((1, 37), 0.3, dtype=dtype).expand(n, 37)
        args = args[:-2] + (p, p) if cell == "lstm" else args[:-1] + (p,)
    expected = forward(*args, bs, reverse, 1e-5)[:n_main]
    got = inference_of(cell)(*args, bs, reverse, 1e-5)
    assert len(got) == n_main
    for e, g in zip(expected, got):
        assert g.dtype == dtype and g.shape == e.shape
        assert torch.equal(g, e)
    if dtype == F64:  # equal, and right
        for e, g in zip(ref(*args, bs, reverse, 1e-5), got):
            assert (g - e).abs().max().item() <= 1e-10


def _ln_op_names(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return {e.name for e in prof.events() if e.name.startswith("fusedrnn::")}, result


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("zoneout", [0.0, 0.25])
def test_layers_without_gradients_run_the_inference_ops(cell, zoneout):
    torch.manual_seed(13)
    cls = fusedrnn.LayerNormLSTM if cell == "lstm" else fusedrnn.LayerNormGRU
    m = randomise(cls(5, 6, num_layers=2, bidirectional=True, zoneout=zoneout)).eval()
    x = torch.randn(7, 3, 5)
    trained, twin = f"fusedrnn::ln_{cell}_forward", f"fusedrnn::ln_{cell}_inference"
    ops, with_grad = _ln_op_names(lambda: m(x))
    assert trained in ops and twin not in ops, ops
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            ops, without = _ln_op_names(lambda: m(x))
        assert twin in ops and trained not in ops, ops
        assert torch.equal(without[0], with_grad[0].detach())
    for p in m.parameters():
        p.requires_grad_(False)
    ops, frozen = _ln_op_names(lambda: m(x))
    assert twin in ops and trained not in ops, ops
    assert torch.equal(frozen[0], with_grad[0].detach())
    ops, _ = _ln_op_names(lambda: m(x.clone().requires_grad_()))  # a gradient of the input can be taken
    assert trained in ops and twin not in ops, ops


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_op_passes_opcheck_and_refuses_gradients(cell):
    args, bs = op_args(cell, RAGGED, dtype=torch.float32)
    torch.library.opcheck(inference_of(cell).default, (*args, bs, True, 1e-5))
    args, bs = op_args(cell, RAGGED, dtype=torch.float32, requires_grad=True)
    out = inference_of(cell)(*args, bs, False, 1e-5)[0]
    with pytest.raises(RuntimeError, match=rf"fusedrnn\.ln_{cell}_inference: .*saves nothing for backward"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match=rf"fusedrnn\.ln_{cell}_inference: batch_sizes must sum"):
        inference_of(cell)(*args, torch.tensor([4, 4, 3, 1]), False, 1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compile_and_export_without_gradients_use_the_inference_op(cell):
    torch._dynamo.reset()
    torch.manual_seed(14)
    cls = fusedrnn.LayerNormLSTM if cell == "lstm" else fusedrnn.LayerNormGRU
    m = randomise(cls(3, 4, bidirectional=True, zoneout=0.2)).eval()
    x = torch.randn(6, 2, 3)
    with torch.no_grad():
        eager = m(x)[0]
        compiled = torch.compile(m, fullgraph=True)(x)[0]
        program = torch.export.export(m, (x,))
        exported = program.module()(x)[0]
    graph = str(program.graph)
    assert f"fusedrnn.ln_{cell}_inference" in graph and f"fusedrnn.ln_{cell}_forward" not in graph, graph
    assert torch.equal(compiled, eager) and torch.equal(exported, eager)
    assert f"fusedrnn.ln_{cell}_forward" in str(torch.export.export(m, (x,)).graph)  # with gradients


def test_training_step_with_zoneout_and_dropout_runs_backward():
    torch.manual_seed(6)
    m = fusedrnn.LayerNormLSTM(3, 4, num_layers=2, dropout=0.5, zoneout=0.1)
    out, (h, c) = m(torch.randn(5, 2, 3))
    (out.sum() + h.sum() + c.sum()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())


# ---- the sentiment recipe (python -m benchmarks.sentiment --cell ln_lstm) ------------------------------

def test_sentiment_recipe_loss_curve_equals_the_python_loop_model():
    # The recipe's own models (make_models), small and in float64: over a few Adam steps on ragged
    # batches, the Python loop of nn.Linear + nn.LayerNorm and fusedrnn.LayerNormLSTM (packed and lengths=)
    # give the same loss curve and end with the same weights.
    from benchmarks import sentiment

    torch.manual_seed(0)
    base = sentiment.SentimentClassifier(50, "ln_lstm", embed=6, hidden=5).double()
    randomise(base.rnn)  # gains and shifts away from their init, so that a swapped LN parameter shows
    models = sentiment.make_models(base, "ln_lstm")
    assert list(models) == ["python loop", "fusedrnn packed", "fusedrnn lengths"]
    assert isinstance(models["python loop"].rnn, LoopLayerNormLSTM)
    assert all(isinstance(models[n].rnn, fusedrnn.LayerNormLSTM) for n in ("fusedrnn packed", "fusedrnn lengths"))
    gen = torch.Generator().manual_seed(2)
    batches = []
    for lengths in ([7, 3, 5, 1], [2, 6, 6, 4], [5, 5, 1, 3]):
        lengths = torch.tensor(lengths)
        tokens = torch.randint(2, 50, (4, 7), generator=gen) * (torch.arange(7) < lengths[:, None])
        batches.append((tokens, lengths, torch.randint(0, 2, (4,), generator=gen).double()))
    curves = {}
    for name, model in models.items():
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        curve = []
        for _ in range(2):  # the same batches again: the second pass sees the weights the first one trained
            for tokens, lengths, y in batches:
                optimizer.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(model(tokens, lengths), y)
                loss.backward()
                optimizer.step()
                curve.append(loss.item())
        curves[name] = torch.tensor(curve, dtype=F64)
    reference = curves["python loop"]
    assert (reference[3:] - reference[:3]).abs().max() > 1e-3  # it trained: the same batches, other losses
    for name in ("fusedrnn packed", "fusedrnn lengths"):
        assert (curves[name] - reference).abs().max().item() <= 1e-10, name
        loop_rnn, fused_rnn = models["python loop"].rnn, models[name].rnn
        for loop_name, fused_name in (("ih.weight", "weight_ih_l0"), ("ln_hh.bias", "bias_hh_l0"),
                                      ("ln_c.weight", "weight_ln_c_l0")):
            trained = dict(loop_rnn.named_parameters())[loop_name]
            assert (trained - getattr(fused_rnn, fused_name)).abs().max().item() <= 1e-10, (name, fused_name)


def test_sentiment_recipe_refuses_ln_lstm_in_the_bidirectional_recipe():
    from benchmarks import sentiment

    info = {"cpu": "AMD EPYC", "isa": "AVX512 (avx2 fma avx512f)"}
    assert sentiment.result_name(sentiment.parse_args(["--cell", "ln_lstm"]), info) == (
        "sentiment_rt_ln_lstm_cpu_amd-epyc-avx512")
    with pytest.raises(SystemExit):
        sentiment.parse_args(["--cell", "ln_lstm", "--model", "bidirectional"])


# ---- state_dict, pickling, DDP, TorchScript, ONNX ------------------------------------------------------

def _ln_models():
    torch.manual_seed(7)
    return {
        "lstm": randomise(fusedrnn.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True, zoneout=(0.2, 0.1),
                                                 layer_norm_eps=1e-3, dtype=F64)),
        "gru": randomise(fusedrnn.LayerNormGRU(3, 4, bias=False, zoneout=0.3, dtype=F64)),
        "lstm_cell": randomise(fusedrnn.LayerNormLSTMCell(3, 4, dtype=F64)),
        "gru_cell": randomise(fusedrnn.LayerNormGRUCell(3, 4, zoneout=0.2, dtype=F64)),
    }


def _outputs(model, x):
    model.eval()  # zoneout's expectation: deterministic
    out = model(x[0] if "Cell" in type(model).__name__ else x)
    out = out[0] if isinstance(out, tuple) else out
    return out


@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm_cell", "gru_cell"])
def test_state_dict_pickle_and_deepcopy_round_trip(kind):
    import copy
    import io
    import pickle

    model = _ln_models()[kind]
    x = torch.randn(5, 2, 3, dtype=F64)
    expected = _outputs(model, x)
    # A fresh model (other random weights) with the state_dict loaded, strictly.
    torch.manual_seed(99)
    fresh = type(model)(3, 4, **({} if "cell" in kind else {"num_layers": model.num_layers,
                                                              "bidirectional": model.bidirectional}),
                        bias=model.bias, zoneout=model.zoneout, layer_norm_eps=model.layer_norm_eps, dtype=F64)
    assert (_outputs(fresh, x) - expected).abs().max() > 1e-3
    fresh.load_state_dict(model.state_dict(), strict=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {"state_dict": fresh, "pickle": pickle.loads(pickle.dumps(model)), "deepcopy": copy.deepcopy(model),
              "torch.save": torch.load(buffer, weights_only=False)}
    for how, other in copies.items():
        assert type(other) is type(model) and other.zoneout == model.zoneout, how
        assert other.layer_norm_eps == model.layer_norm_eps, how
        assert torch.equal(_outputs(other, x), expected), how
        if hasattr(model, "_ln_names"):  # the LN parameters are registered on the copy, not shared
            assert all(getattr(other, n) is not getattr(model, n) for names in model._ln_names for n in names)


def test_torchscript_script_raises_a_clear_error_and_trace_works():
    # torch.jit.script cannot compile the modules (a clear error); torch.jit.trace records the op itself.
    for model in _ln_models().values():
        with pytest.raises(RuntimeError, match="TorchScript is not supported"):
            torch.jit.script(model)


class _LayerNormClassifier(nn.Module):
    """A 2-layer bidirectional layer-normalised layer on a packed ragged batch and a linear head: every
    parameter kind (torch.nn's and the LN gains and shifts) DDP has to reduce."""

    def __init__(self, cell: str):
        super().__init__()
        cls = fusedrnn.LayerNormLSTM if cell == "lstm" else fusedrnn.LayerNormGRU
        self.rnn = randomise(cls(3, 4, num_layers=2, bidirectional=True, batch_first=True, dtype=F64))
        self.fc = nn.Linear(8, 1, dtype=F64)

    def forward(self, x, lengths):
        _, state = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        h = state[0] if isinstance(state, tuple) else state
        return self.fc(torch.cat([h[-2], h[-1]], dim=1)).squeeze(-1)


def _ddp_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 3, generator=gen, dtype=F64)
    lengths = torch.randint(1, 6, (8,), generator=gen)
    return x, lengths, torch.randint(0, 2, (8,), generator=gen).double()


def _ddp_train(model, forward, x, lengths, y):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(forward(x, lengths), y).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    try:
        x, lengths, y = _ddp_batch()
        rows = slice(rank, None, 2)
        weights = {}
        for cell in ("lstm", "gru"):
            torch.manual_seed(0)
            model = _LayerNormClassifier(cell)
            weights[cell] = _ddp_train(model, DistributedDataParallel(model), x[rows], lengths[rows], y[rows])
        torch.save(weights, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_training_equals_one_process_on_the_whole_batch(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with gloo")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, lengths, y = _ddp_batch()
    for cell in ("lstm", "gru"):
        # One process, the whole batch: DDP averages the ranks' gradients of their shard means, which is
        # the gradient of the whole batch's mean.
        torch.manual_seed(0)
        single = _LayerNormClassifier(cell)
        untrained = copy_state(single)
        expected = _ddp_train(single, single, x, lengths, y)
        assert any(k.startswith("rnn.weight_ln_") for k in expected)
        assert all((expected[k] - untrained[k]).abs().max() > 1e-3 for k in expected)  # every weight trained
        for r, got in enumerate(ranks):
            assert got[cell].keys() == expected.keys()
            for k in expected:
                torch.testing.assert_close(got[cell][k], expected[k], rtol=0, atol=1e-10, msg=f"{cell} rank {r}: {k}")


def copy_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    model = randomise(fusedrnn.LayerNormLSTM(3, 4, num_layers=2, dtype=F64)).eval()
    traced = torch.jit.trace(model, (torch.randn(5, 2, 3, dtype=F64),), check_trace=False)
    x = torch.randn(7, 3, 3, dtype=F64)  # another length and batch than the traced ones
    assert (traced(x)[0] - model(x)[0]).abs().max().item() <= 1e-12


def test_onnx_export_as_standard_ops_runs_in_onnxruntime_or_says_which_exporter():
    import io

    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(8)
    for model in (randomise(fusedrnn.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True, zoneout=0.2)),
                  randomise(fusedrnn.LayerNormGRU(3, 4, batch_first=True))):
        model.eval()  # zoneout's expectation p * previous + (1 - p) * new: part of the exported graph
        x = torch.randn(5, 2, 3)
        expected = model(x)[0].detach().numpy()
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"])
        proto = onnx.load_from_string(buffer.getvalue())
        onnx.checker.check_model(proto, full_check=True)
        assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)  # standard operators only
        assert "LayerNormalization" in {node.op_type for node in proto.graph.node}
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.numpy()})[0]
        assert abs(got - expected).max() <= 1e-5
        pytest.importorskip("onnxscript")
        with pytest.raises(Exception) as info:
            torch.onnx.export(model, (x,), dynamo=True)
        messages = []
        error = info.value
        while error is not None:
            messages.append(str(error))
            error = error.__cause__ or error.__context__
        assert any("dynamo=False" in m and "layer-normalised" in m for m in messages), messages[:2]
