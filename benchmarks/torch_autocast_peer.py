"""The peers' PyTorch LSTM with this project's numerics: the fair partner for our contenders.

Runs ../shared/bench/peers/torch_lstm.py unchanged except for two settings, given before its own
arguments:
- `--dtype bfloat16` (default): each training step runs inside
  `torch.autocast("cpu", dtype=torch.bfloat16)`, so PyTorch gets the same chance to use this CPU's
  bfloat16 matmuls as our `--dtype bfloat16`; `--dtype float32` leaves the step as it is.
- `--flush_denormal`: `torch.set_flush_denormal(True)`, subnormal floats read and written as zero, as
  XLA's CPU runtime always runs. PyTorch's default keeps them, and on CPUs that take slow microcode
  paths for them (seen: Intel Sapphire Rapids) its float32 LSTM then trains 10-15x slower.
As a paired-bench contender (run from ../shared/bench/peers with the peers' torch venv):

  --contender "torch uni bf16=/tmp/peers/torch-venv/bin/python /path/to/benchmarks/torch_autocast_peer.py --mode serve --model uni"
  --contender "torch uni ftz=... torch_autocast_peer.py --dtype float32 --flush_denormal --mode serve --model uni"
"""

import argparse
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


if __name__ == "__main__":
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ours.add_argument("--flush_denormal", action="store_true")
    settings, sys.argv[1:] = ours.parse_known_args()
    if settings.dtype == "bfloat16":
        torch_lstm.train_step = autocast_step
    if settings.flush_denormal and not torch.set_flush_denormal(True):
        sys.exit("torch_autocast_peer: --flush_denormal: this CPU cannot flush subnormals")
    torch_lstm.main()
