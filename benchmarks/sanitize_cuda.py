"""A small forward + backward of every cell, the workload that benchmarks/gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck, initcheck): two layers, bidirectional, a ragged packed
batch and a full one, float32 and bfloat16, projection included, the LSTM cell too, at a tiny
hidden size and at 128 (where the persistent kernels tile). Run as a module, so that it imports
the fusedrnn of this checkout however it was built:

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_cuda --path per_step
    python -m benchmarks.sanitize_cuda --device cpu     # the same workload on the CPU

FUSEDRNN_POISON_OUTPUTS is left unset on purpose: buffers start uninitialised, so initcheck sees
a kernel that reads an element nothing wrote.
"""

import argparse
import os
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

CELLS = [(fusedrnn.LSTM, {}), (fusedrnn.LSTM, {"proj_size": 5}), (fusedrnn.GRU, {}),
         (fusedrnn.RNN, {"nonlinearity": "tanh"}), (fusedrnn.RNN, {"nonlinearity": "relu"})]
HIDDEN_SIZES = (24, 128)


def run(device: str) -> int:
    """Runs the workload; returns how many forward + backward passes ran."""
    torch.manual_seed(0)
    passes = 0
    for dtype in (torch.float32, torch.bfloat16):
        for hidden in HIDDEN_SIZES:
            for cls, extra in CELLS:
                m = cls(12, hidden, num_layers=2, bidirectional=True, device=device, dtype=dtype, **extra)
                x = torch.randn(9, 5, 12, device=device, dtype=dtype, requires_grad=True)
                for packed in (False, True):
                    inp = pack_padded_sequence(x, torch.tensor([9, 2, 7, 1, 5]), enforce_sorted=False) if packed else x
                    out, state = m(inp)
                    data = out.data if packed else out
                    h = state[0] if isinstance(state, tuple) else state
                    (data.float().square().sum() + h.float().sum()).backward()
                    passes += 1
            cell = fusedrnn.LSTMCell(12, hidden, device=device, dtype=dtype)
            x = torch.randn(5, 12, device=device, dtype=dtype, requires_grad=True)
            cell(x)[0].float().sum().backward()
            passes += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return passes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--path", default=None, choices=["per_step", "persistent", "auto"],
                        help="CUDA path to force (sets FUSEDRNN_CUDA_PATH before the first op)")
    args = parser.parse_args(argv)
    if args.path:
        os.environ["FUSEDRNN_CUDA_PATH"] = args.path
    info = fusedrnn.backends()
    if args.device == "cuda" and not (torch.cuda.is_available() and info["cuda"]):
        print(f"CUDA cannot run: torch.cuda.is_available() = {torch.cuda.is_available()}, "
              f"fusedrnn.backends() = {info}")
        return 2
    passes = run(args.device)
    print(f"sanitize workload done: {passes} forward + backward passes on {args.device} "
          f"(path {os.environ.get('FUSEDRNN_CUDA_PATH', 'auto')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
