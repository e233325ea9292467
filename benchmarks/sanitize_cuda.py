"""A small forward + backward of every cell on CUDA, for compute-sanitizer (memcheck and
racecheck) in benchmarks/gpu_check.sh: bidirectional, two layers, a ragged packed batch and a
full one, float32 and bfloat16, projection included."""

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

CELLS = [(fusedrnn.LSTM, {}), (fusedrnn.LSTM, {"proj_size": 5}), (fusedrnn.GRU, {}),
         (fusedrnn.RNN, {"nonlinearity": "tanh"}), (fusedrnn.RNN, {"nonlinearity": "relu"})]


def main():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for cls, extra in CELLS:
            m = cls(12, 24, num_layers=2, bidirectional=True, device="cuda", dtype=dtype, **extra)
            x = torch.randn(9, 5, 12, device="cuda", dtype=dtype, requires_grad=True)
            for packed in (False, True):
                inp = pack_padded_sequence(x, torch.tensor([9, 2, 7, 1, 5]), enforce_sorted=False) if packed else x
                out, state = m(inp)
                data = out.data if packed else out
                h = state[0] if isinstance(state, tuple) else state
                (data.float().square().sum() + h.float().sum()).backward()
            cell = fusedrnn.LSTMCell(12, 24, device="cuda", dtype=dtype) if cls is fusedrnn.LSTM else None
            if cell is not None:
                cell(x[0])[0].float().sum().backward()
    torch.cuda.synchronize()
    print("sanitize workload done")


if __name__ == "__main__":
    main()
