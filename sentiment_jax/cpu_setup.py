"""Runs a training command with the fastest CPU settings for the machine it finds (what `make train` uses).

  python -m sentiment_jax.cpu_setup [--dry_run] -- python -m sentiment_jax.main --config=configs/lstm.py ...

- devices: `--cpu_devices=N`, one single-threaded device per usable core, N rounded down to a power of
  two so that it divides the batch; except for an LSTM on the CPU kernel (below), which runs fastest on
  JAX's one multi-threaded device, its custom calls splitting the rows over the cores (no device waits
  for another at the gradient reduction): nothing is added then;
- malloc: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, transparent huge pages for XLA's large temporaries;
- dtype: `--config.model.dtype=bfloat16` only where the CPU has bfloat16 matmul units (avx512_bf16 or
  amx_bf16 in /proc/cpuinfo); elsewhere bfloat16 is emulated and slower than float32;
- LSTM: `--config.model.lstm_backend=auto`, the recurrence as compiled CPU custom calls wherever a C++
  compiler builds them (cpu_kernels.py), else the scan; models without LSTM layers ignore it.

Measured in docs/results.md § Speed: devices and malloc 1.5x on 2 cores, bfloat16 a further 1.3-1.5x
on AVX512-BF16 at the same IMDB accuracy, the LSTM kernel 1.25-1.8x over the scan. A setting the command
(or, for malloc, the environment) already gives is kept. With an NVIDIA GPU present nothing is added: these are CPU settings.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import sys

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags every processor in /proc/cpuinfo's text reports."""
    sets = [set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
            if line.split(":", 1)[0].strip() in ("flags", "Features")]
    return set.intersection(*sets) if sets else set()


def machine_flags() -> set[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo is missing)."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    return cpu_flags(cpuinfo.read_text()) if cpuinfo.is_file() else set()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compiler() -> str | None:
    """The C++ compiler the CPU kernel is built with: $CXX, else c++, g++ or clang++ on the PATH."""
    return next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)


def config_model(command: list[str]) -> str | None:
    """model.name of the command's `--config=FILE[:VARIANT]` (or its --config.model.name); None if unknown."""
    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in command if a.startswith("--config") and "=" in a}
    if "--config.model.name" in given or "--config" not in given:
        return given.get("--config.model.name")
    file, _, variant = given["--config"].partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_cpu_setup_config", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return (module.get_config(variant) if variant else module.get_config()).model.name
    except Exception:  # noqa: BLE001 (the command itself reports a config it cannot load)
        return None


def lstm_on_kernel(command: list[str]) -> bool:
    """Whether the command trains an LSTM that `--config.model.lstm_backend=auto` (or cpu_kernel) puts on
    the CPU kernel: its config's model is an LSTM, no other backend is given, and a compiler exists."""
    backend = next((a.split("=", 1)[1] for a in command if a.startswith("--config.model.lstm_backend=")), "auto")
    return backend in ("auto", "cpu_kernel") and config_model(command) == "lstm" and compiler() is not None


def choose(cores: int, flags: set[str], lstm_kernel: bool = False) -> dict:
    """Devices, matmul dtype and malloc tunable for `cores` usable cores with these CPU flags;
    `lstm_kernel`: the command trains an LSTM that the CPU kernel will run."""
    devices = 1
    while devices * 2 <= cores:
        devices *= 2
    devices = 0 if lstm_kernel else devices  # 0: JAX's default device
    return {"cpu_devices": devices, "dtype": "bfloat16" if flags & set(BF16_FLAGS) else "float32",
            "lstm_backend": "auto", "malloc": HUGE_PAGES}


def apply(command: list[str], env: dict, settings: dict) -> tuple[list[str], dict]:
    """The command and environment with the settings added where they do not already say otherwise."""
    command, env = list(command), dict(env)
    given = lambda name: any(arg == name or arg.startswith(name + "=") for arg in command)
    if not given("--cpu_devices") and settings["cpu_devices"]:
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
        flags, cores, given = machine_flags(), usable_cores(), len(command)
        command, env = apply(command, env, choose(cores, flags, lstm_on_kernel(command)))
        found = ", ".join(f for f in BF16_FLAGS if f in flags) or "no bfloat16 units"
        print(f"cpu_setup: {cores} usable cores, {found}: adds {' '.join(command[given:]) or 'no flags'}, "
              f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}", file=sys.stderr, flush=True)
    if dry_run:
        print(" ".join(command))
        return
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
