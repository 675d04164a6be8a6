"""Runs a training command with the fastest CPU settings for the machine it finds (what `make train` uses).

  python -m sentiment_jax.cpu_setup [--dry_run] -- python -m sentiment_jax.main --config=configs/lstm.py ...

- devices: `--cpu_devices=N`, one single-threaded device per usable core, N rounded down to a power of
  two so that it divides the batch;
- malloc: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, transparent huge pages for XLA's large temporaries;
- dtype: `--config.model.dtype=bfloat16` only where the CPU has bfloat16 matmul units (avx512_bf16 or
  amx_bf16 in /proc/cpuinfo); elsewhere bfloat16 is emulated and slower than float32;
- LSTM: `--config.model.lstm_backend=auto`, the recurrence as compiled CPU custom calls wherever a C++
  compiler builds them (cpu_kernels.py), else the scan; models without LSTM layers ignore it.

Measured in docs/results.md § Speed: devices and malloc 1.5x on 2 cores, bfloat16 a further 1.3-1.5x
on AVX512-BF16 at the same IMDB accuracy, the LSTM kernel 1.2-1.4x over the scan. A setting the command (or, for malloc, the environment)
already gives is kept. With an NVIDIA GPU present nothing is added: these are CPU settings.
"""

from __future__ import annotations

import os
import pathlib
import sys

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags every processor in /proc/cpuinfo's text reports."""
    sets = [set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
            if line.split(":", 1)[0].strip() in ("flags", "Features")]
    return set.intersection(*sets) if sets else set()


def choose(cores: int, flags: set[str]) -> dict:
    """Devices, matmul dtype and malloc tunable for `cores` usable cores with these CPU flags."""
    devices = 1
    while devices * 2 <= cores:
        devices *= 2
    return {"cpu_devices": devices, "dtype": "bfloat16" if flags & set(BF16_FLAGS) else "float32",
            "lstm_backend": "auto", "malloc": HUGE_PAGES}


def apply(command: list[str], env: dict, settings: dict) -> tuple[list[str], dict]:
    """The command and environment with the settings added where they do not already say otherwise."""
    command, env = list(command), dict(env)
    given = lambda name: any(arg == name or arg.startswith(name + "=") for arg in command)
    if not given("--cpu_devices"):
        command.append(f"--cpu_devices={settings['cpu_devices']}")
    if not given("--config.model.dtype"):
        command.append(f"--config.model.dtype={settings['dtype']}")
    if not given("--config.model.lstm_backend"):
        command.append(f"--config.model.lstm_backend={settings['lstm_backend']}")
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = f"{tunables}:{settings['malloc']}" if tunables else settings["malloc"]
    return command, env


def has_nvidia_gpu() -> bool:
    return pathlib.Path("/dev/nvidiactl").exists()


def main(argv: list[str]) -> None:
    dry_run = "--dry_run" in argv[: argv.index("--")] if "--" in argv else False
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    if not command:
        sys.exit("error: usage: python -m sentiment_jax.cpu_setup [--dry_run] -- COMMAND [ARGS...]")
    env = dict(os.environ)
    if has_nvidia_gpu():
        print("cpu_setup: an NVIDIA GPU is present; no CPU settings added", file=sys.stderr, flush=True)
    else:
        cpuinfo = pathlib.Path("/proc/cpuinfo")
        flags = cpu_flags(cpuinfo.read_text()) if cpuinfo.is_file() else set()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        given = len(command)
        command, env = apply(command, env, choose(cores, flags))
        found = ", ".join(f for f in BF16_FLAGS if f in flags) or "no bfloat16 units"
        print(f"cpu_setup: {cores} usable cores, {found}: adds {' '.join(command[given:]) or 'no flags'}, "
              f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}", file=sys.stderr, flush=True)
    if dry_run:
        print(" ".join(command))
        return
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
