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
    zh = torch.empty(T * B, H, dtype=F64).bernoulli_(p)
    zc = torch.empty(T * B, H, dtype=F64).bernoulli_(p) if cell == "lstm" else None
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


def test_zoneout_mask_rate_and_eval_expectation():
    torch.manual_seed(0)
    mask = fusedrnn.layernorm.zoneout_weights(0.25, 2000, 50, torch.empty(0), True)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - 0.25) < 0.01
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


def test_training_step_with_zoneout_and_dropout_runs_backward():
    torch.manual_seed(6)
    m = fusedrnn.LayerNormLSTM(3, 4, num_layers=2, dropout=0.5, zoneout=0.1)
    out, (h, c) = m(torch.randn(5, 2, 3))
    (out.sum() + h.sum() + c.sum()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())
