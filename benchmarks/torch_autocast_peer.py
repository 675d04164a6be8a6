"""The peers' PyTorch LSTM trained under bfloat16 autocast: the fair partner for our `--dtype bfloat16`.

Runs ../shared/bench/peers/torch_lstm.py unchanged except that each training step runs inside
`torch.autocast("cpu", dtype=torch.bfloat16)`, so PyTorch gets the same chance to use this CPU's
bfloat16 matmuls as our bfloat16 contender. Same arguments as torch_lstm.py, e.g. as a paired-bench
contender (run from ../shared/bench/peers with the peers' torch venv):

  --contender "torch uni bf16=/tmp/peers/torch-venv/bin/python /path/to/benchmarks/torch_autocast_peer.py --mode serve --model uni"
"""

import os
import sys

import torch

sys.path.insert(0, os.getcwd())  # the peers' directory: the bench starts contenders there
try:
    import torch_lstm  # noqa: E402
except ImportError:
    sys.exit(f"torch_autocast_peer: no torch_lstm.py in {os.getcwd()}; run it from ../shared/bench/peers")

_plain_step = torch_lstm.train_step


def autocast_step(model, opt, xb, yb):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _plain_step(model, opt, xb, yb)


torch_lstm.train_step = autocast_step

if __name__ == "__main__":
    torch_lstm.main()
