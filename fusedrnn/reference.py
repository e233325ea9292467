"""Plain-PyTorch implementation of every fusedrnn layer op.

Two jobs: it is the test oracle for the compiled kernels (written
independently of them, step by step with torch ops, differentiable by
autograd), and it is the fallback that runs when the compiled library cannot
be loaded. Signatures match the compiled ops' main outputs: one layer, one
direction, packed time-major input [tokens, input_size] with `batch_sizes`
per step (see csrc/ops.cpp).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _schedule(batch_sizes: Tensor, reverse: bool) -> Tuple[List[int], List[int], List[int]]:
    sizes = [int(b) for b in batch_sizes.tolist()]
    offsets, total = [], 0
    for b in sizes:
        offsets.append(total)
        total += b
    order = list(range(len(sizes)))
    if reverse:
        order.reverse()
    return sizes, offsets, order


def _run(cell, input: Tensor, state: Tuple[Tensor, ...], w_ih: Tensor, b_ih: Optional[Tensor],
         batch_sizes: Tensor, reverse: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """Runs `cell(x_proj_rows, state_rows) -> (out_rows, new_state_rows)` over the
    packed sequence; rows past a step's batch size keep their state."""
    sizes, offsets, order = _schedule(batch_sizes, reverse)
    x_proj = F.linear(input, w_ih, b_ih)
    outs: List[Optional[Tensor]] = [None] * len(sizes)
    for t in order:
        bs, off = sizes[t], offsets[t]
        out, new = cell(x_proj[off:off + bs], tuple(s[:bs] for s in state))
        outs[t] = out
        state = tuple(torch.cat([n, s[bs:]]) for n, s in zip(new, state))
    if outs:
        output = torch.cat(outs)  # type: ignore[arg-type]
    else:
        output = input.new_empty(0, state[0].shape[1])
    return output, state


def lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
               b_hh: Optional[Tensor], w_hr: Optional[Tensor], batch_sizes: Tensor,
               reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    def cell(xp, state):
        h, c = state
        i, f, g, o = (xp + F.linear(h, w_hh, b_hh)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        return h, (h, c)

    output, (h, c) = _run(cell, input, (h0, c0), w_ih, b_ih, batch_sizes, reverse)
    return output, h, c


def gru_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], batch_sizes: Tensor, reverse: bool) -> Tuple[Tensor, Tensor]:
    def cell(xp, state):
        (h,) = state
        xr, xz, xn = xp.chunk(3, 1)
        hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        return h, (h,)

    output, (h,) = _run(cell, input, (h0,), w_ih, b_ih, batch_sizes, reverse)
    return output, h


def rnn_layer(nonlinearity: str, input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], batch_sizes: Tensor, reverse: bool) -> Tuple[Tensor, Tensor]:
    act = torch.tanh if nonlinearity == "tanh" else torch.relu

    def cell(xp, state):
        (h,) = state
        h = act(xp + F.linear(h, w_hh, b_hh))
        return h, (h,)

    output, (h,) = _run(cell, input, (h0,), w_ih, b_ih, batch_sizes, reverse)
    return output, h


# ---- layer-normalised LSTM / GRU, and zoneout ----------------------------------------------------
# The oracle of csrc/layernorm/ (and its fallback), written step by step with plain torch ops
# (F.layer_norm), independently of the kernels. Equations (Ba, Kiros & Hinton 2016, in the form haste
# uses), with G the gate vector (4H for LSTM, 3H for GRU) of one row:
#
#   a_x = LN(W_ih x; weight_ln_ih) + b_ih        LN over all G entries, gain only: the shift
#   a_h = LN(W_hh h; weight_ln_hh) + b_hh        is the layer's own bias (b_ih, b_hh)
#   LSTM:  i, f, g, o = split(a_x + a_h);  c' = sigmoid(f) c + sigmoid(i) tanh(g)
#          h' = sigmoid(o) tanh(LN(c'; weight_ln_c, bias_ln_c))
#   GRU:   r = sigmoid(a_x,r + a_h,r);  z = sigmoid(a_x,z + a_h,z)
#          n = tanh(a_x,n + r * a_h,n);  h' = (1 - z) n + z h        (torch.nn.GRU's equations)
#
# where LN(v; w, b) = (v - mean(v)) / sqrt(var(v) + eps) * w + b, var the biased variance
# (F.layer_norm's), eps = LAYER_NORM_EPS unless given. Zoneout (Krueger et al. 2016) then mixes each
# new state with the previous one: h_t = z_h * h_{t-1} + (1 - z_h) * h', c_t = z_c * c_{t-1} + (1 - z_c) c',
# where z_h, z_c ([tokens, H], one row per packed row) are Bernoulli(p) masks in training and the
# constant p in eval; None means no zoneout. The output at each step is h_t.
# Without weight_ln_ih (None) the cell is the plain LSTM / GRU (with zoneout): for checking zoneout alone.

LAYER_NORM_EPS = 1e-5


def _run_rows(cell, rows: Tuple[Optional[Tensor], ...], state: Tuple[Tensor, ...], batch_sizes: Tensor,
              reverse: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """As _run, over several per-row tensors ([tokens, *] each, or None) that each step slices."""
    sizes, offsets, order = _schedule(batch_sizes, reverse)
    outs: List[Optional[Tensor]] = [None] * len(sizes)
    for t in order:
        bs, off = sizes[t], offsets[t]
        out, new = cell(tuple(None if r is None else r[off:off + bs] for r in rows), tuple(s[:bs] for s in state))
        outs[t] = out
        state = tuple(torch.cat([n, s[bs:]]) for n, s in zip(new, state))
    output = torch.cat(outs) if outs else state[0].new_empty(0, state[0].shape[1])  # type: ignore[arg-type]
    return output, state


def _layer_norm(v: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return F.layer_norm(v, (v.shape[-1],), weight, bias, eps)


def _zoneout(keep: Optional[Tensor], previous: Tensor, new: Tensor) -> Tensor:
    return new if keep is None else keep * previous + (1 - keep) * new


def _gate_inputs(input: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], ln_ih_w: Optional[Tensor],
                 eps: float) -> Tensor:
    if ln_ih_w is None:
        return F.linear(input, w_ih, b_ih)
    return _layer_norm(F.linear(input, w_ih), ln_ih_w, b_ih, eps)


def _recurrent(h: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], ln_hh_w: Optional[Tensor], eps: float) -> Tensor:
    if ln_hh_w is None:
        return F.linear(h, w_hh, b_hh)
    return _layer_norm(F.linear(h, w_hh), ln_hh_w, b_hh, eps)


def ln_lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                  b_hh: Optional[Tensor], ln_ih_w: Optional[Tensor], ln_hh_w: Optional[Tensor],
                  ln_c_w: Optional[Tensor], ln_c_b: Optional[Tensor], zoneout_h: Optional[Tensor],
                  zoneout_c: Optional[Tensor], batch_sizes: Tensor, reverse: bool,
                  eps: float = LAYER_NORM_EPS) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer-normalised LSTM layer (equations above). Returns (output [N, H], h_n, c_n)."""
    a_x = _gate_inputs(input, w_ih, b_ih, ln_ih_w, eps)

    def cell(rows, state):
        ax, zh, zc = rows
        h, c = state
        i, f, g, o = (ax + _recurrent(h, w_hh, b_hh, ln_hh_w, eps)).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = c_new if ln_c_w is None else _layer_norm(c_new, ln_c_w, ln_c_b, eps)
        h_new = torch.sigmoid(o) * torch.tanh(c_out)
        h_next, c_next = _zoneout(zh, h, h_new), _zoneout(zc, c, c_new)
        return h_next, (h_next, c_next)

    output, (h, c) = _run_rows(cell, (a_x, zoneout_h, zoneout_c), (h0, c0), batch_sizes, reverse)
    return output, h, c


def ln_gru_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                 b_hh: Optional[Tensor], ln_ih_w: Optional[Tensor], ln_hh_w: Optional[Tensor],
                 zoneout_h: Optional[Tensor], batch_sizes: Tensor, reverse: bool,
                 eps: float = LAYER_NORM_EPS) -> Tuple[Tensor, Tensor]:
    """One layer-normalised GRU layer (equations above). Returns (output [N, H], h_n)."""
    a_x = _gate_inputs(input, w_ih, b_ih, ln_ih_w, eps)

    def cell(rows, state):
        ax, zh = rows
        (h,) = state
        xr, xz, xn = ax.chunk(3, 1)
        hr, hz, hn = _recurrent(h, w_hh, b_hh, ln_hh_w, eps).chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h_next = _zoneout(zh, h, (1 - z) * n + z * h)
        return h_next, (h_next,)

    output, (h,) = _run_rows(cell, (a_x, zoneout_h), (h0,), batch_sizes, reverse)
    return output, h
