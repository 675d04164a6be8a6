"""Runs a training command with the fastest CPU settings for the machine it finds (what `make train` uses).

  python -m sentiment_jax.cpu_setup [--dry_run] -- python -m sentiment_jax.main --config=configs/lstm.py ...

- devices: `--cpu_devices=N`, one single-threaded device per usable core, N rounded down to a power of
  two so that it divides the batch; except for an LSTM on the CPU kernel (below), which runs fastest on
  JAX's one multi-threaded device, its custom calls splitting the rows over the cores (no device waits
  for another at the gradient reduction): nothing is added then;
- malloc: jemalloc where the system has it (`apt install libjemalloc2`), preloaded with huge pages and
  freed memory kept for reuse: XLA allocates its large temporaries afresh every step, and glibc hands
  them back to the kernel, which faults in and zeroes every page again. Elsewhere glibc with
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which faults them in 2 MB at a time;
- dtype: `--config.model.dtype=bfloat16` only where the CPU has bfloat16 matmul units (avx512_bf16 or
  amx_bf16 in /proc/cpuinfo); elsewhere bfloat16 is emulated and slower than float32;
- LSTM: `--config.model.lstm_backend=auto`, the recurrence as compiled CPU custom calls wherever a C++
  compiler builds them (cpu_kernels.py), else the scan; models without LSTM layers ignore it.

Measured in docs/results.md § Speed: devices and malloc 1.5x on 2 cores, bfloat16 a further 1.3-1.5x
on AVX512-BF16 at the same IMDB accuracy, the LSTM kernel 1.1-1.8x over the scan, jemalloc 1.23x over
glibc's huge pages for `make train`. A setting the command (or, for malloc, the environment) already
gives is kept. With an NVIDIA GPU present nothing is added: these are CPU settings.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import platform
import shutil
import sys

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
HUGE_PAGES = "glibc.malloc.hugetlb=1"
JEMALLOC_CONF = "thp:always,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# XLA's --xla_cpu_max_isa levels, oldest first: the /proc/cpuinfo flag prefixes each adds (a flag belongs
# to the last level naming a prefix of it), and the compiler flags that leave them out. Capping XLA on a
# newer CPU (XLA_FLAGS=--xla_cpu_max_isa=AVX2) measures an older instruction set; the dtype chosen here
# and the LSTM kernel's build follow the cap.
ISA_LEVELS = (("SSE4_2", (), ()), ("AVX", ("avx", "f16c"), ("-mno-avx",)),
              ("AVX2", ("avx2", "fma"), ("-mno-avx2", "-mno-fma")), ("AVX512", ("avx512",), ("-mno-avx512f",)),
              ("AVX512_VNNI", ("avx512_vnni",), ("-mno-avx512vnni",)),
              ("AVX512_BF16", ("avx512_bf16",), ("-mno-avx512bf16",)), ("AMX", ("amx",), ("-mno-amx-tile",)))


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags every processor in /proc/cpuinfo's text reports."""
    sets = [set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
            if line.split(":", 1)[0].strip() in ("flags", "Features")]
    return set.intersection(*sets) if sets else set()


def isa_cap() -> int:
    """Index in ISA_LEVELS of $XLA_FLAGS' --xla_cpu_max_isa (the newest level when none is given)."""
    names = [name for name, _, _ in ISA_LEVELS]
    given = [a.split("=", 1)[1].upper() for a in os.environ.get("XLA_FLAGS", "").split()
             if a.startswith("--xla_cpu_max_isa=")]
    return names.index(given[-1]) if given and given[-1] in names else len(names) - 1


def isa_level(flag: str) -> int | None:
    """Index in ISA_LEVELS of the level that adds this /proc/cpuinfo flag; None for other flags."""
    found = [i for i, (_, prefixes, _) in enumerate(ISA_LEVELS) if any(flag.startswith(p) for p in prefixes)]
    return found[-1] if found else None


def capped(flags: set[str], cap: int) -> set[str]:
    """The flags at or below ISA_LEVELS[cap]."""
    return {f for f in flags if (isa_level(f) or 0) <= cap}


def machine_flags() -> set[str]:
    """The CPU feature flags this process may use: /proc/cpuinfo's (empty where it is missing), less
    those above XLA's --xla_cpu_max_isa."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    return capped(cpu_flags(cpuinfo.read_text()) if cpuinfo.is_file() else set(), isa_cap())


def compiler_isa_flags() -> list[str]:
    """Compiler flags that leave out the instruction sets above XLA's --xla_cpu_max_isa."""
    return [flag for _, _, flags in ISA_LEVELS[isa_cap() + 1:] for flag in flags]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compiler() -> str | None:
    """The C++ compiler the CPU kernel is built with: $CXX, else c++, g++ or clang++ on the PATH."""
    return next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)


def jemalloc() -> str | None:
    """The system's jemalloc library (Debian/Ubuntu libjemalloc2, Fedora jemalloc), if it has one."""
    arch = f"{platform.machine()}-linux-gnu"
    found = [p for p in (f"/usr/lib/{arch}/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                         "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2") if os.path.isfile(p)]
    return found[0] if found else None


def malloc_env(jemalloc_path: str | None) -> dict[str, str]:
    """The environment that selects the allocator: jemalloc at that path, else glibc with huge pages."""
    if jemalloc_path:
        return {"LD_PRELOAD": jemalloc_path, "MALLOC_CONF": JEMALLOC_CONF}
    return {"GLIBC_TUNABLES": HUGE_PAGES}


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


def choose(cores: int, flags: set[str], lstm_kernel: bool = False, jemalloc_path: str | None = None) -> dict:
    """Devices, matmul dtype and allocator for `cores` usable cores with these CPU flags;
    `lstm_kernel`: the command trains an LSTM that the CPU kernel will run; `jemalloc_path`: the
    system's jemalloc, if any."""
    devices = 1
    while devices * 2 <= cores:
        devices *= 2
    devices = 0 if lstm_kernel else devices  # 0: JAX's default device
    return {"cpu_devices": devices, "dtype": "bfloat16" if flags & set(BF16_FLAGS) else "float32",
            "lstm_backend": "auto", "malloc": malloc_env(jemalloc_path)}


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
    if "malloc" in env.get("LD_PRELOAD", "") or "glibc.malloc.hugetlb" in tunables:
        return command, env  # the environment already chose an allocator
    malloc = dict(settings["malloc"])
    if "GLIBC_TUNABLES" in malloc and tunables:
        malloc["GLIBC_TUNABLES"] = f"{tunables}:{malloc['GLIBC_TUNABLES']}"
    if "LD_PRELOAD" in malloc and env.get("LD_PRELOAD"):
        malloc["LD_PRELOAD"] = f"{malloc['LD_PRELOAD']}:{env['LD_PRELOAD']}"
    env.update(malloc)
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
        before = dict(env)
        command, env = apply(command, env, choose(cores, flags, lstm_on_kernel(command), jemalloc()))
        found = ", ".join(f for f in BF16_FLAGS if f in flags) or "no bfloat16 units"
        added = " ".join(f"{k}={v}" for k, v in env.items() if before.get(k) != v) or "the environment's malloc"
        print(f"cpu_setup: {cores} usable cores, {found}: adds {' '.join(command[given:]) or 'no flags'}, "
              f"{added}", file=sys.stderr, flush=True)
    if dry_run:
        print(" ".join(command))
        return
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
