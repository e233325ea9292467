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
