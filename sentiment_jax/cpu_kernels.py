"""The LSTM recurrence as XLA custom calls on CPU (`model.lstm_backend="cpu_kernel"`).

`csrc/lstm_cpu.cc` holds the two sequential loops of an LSTM layer, forward and gradient, in C++
against XLA's FFI. It is compiled on first use with the machine's C++ compiler and `-march=native`
(the vector width and instructions of the CPU that runs it), cached under
$SENTIMENT_JAX_CACHE/kernels keyed by source, compiler, jaxlib, flags and the CPU's instruction sets,
and registered with XLA.
The scan in models/recurrent.py is the reference it is tested against.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import pathlib
import platform
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sentiment_jax import cpu_setup
from sentiment_jax.files import atomic_path

SOURCE = pathlib.Path(__file__).with_name("csrc") / "lstm_cpu.cc"
# -fno-trapping-math lets the gate loops vectorise (nothing here relies on floating-point traps).
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-trapping-math", "-std=c++17", "-pthread",
         "-shared", "-fPIC")
TARGETS = {"forward": "sentiment_jax_lstm_forward", "backward": "sentiment_jax_lstm_backward"}


class KernelError(RuntimeError):
    """The kernel could not be built or loaded; the message says why and what to do."""


def _compiler() -> str:
    if found := cpu_setup.compiler():
        return found
    raise KernelError("model.lstm_backend 'cpu_kernel' needs a C++17 compiler (c++, g++ or clang++, or $CXX) "
                      "and none was found; install one or set --config.model.lstm_backend=scan")


def _cpu() -> str:
    """The instruction sets -march=native builds for: a cache shared by several machines keeps one
    library per CPU kind, never one another CPU cannot run."""
    return " ".join([platform.machine(), *sorted(cpu_setup.machine_flags())])


def _flags() -> list[str]:
    """FLAGS, less the instruction sets above XLA's --xla_cpu_max_isa where one is set."""
    return [*FLAGS, *cpu_setup.compiler_isa_flags()]


def _library_path(compiler: str) -> pathlib.Path:
    from sentiment_jax.data import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, jax.lib.__version__, *_flags(), _cpu())).encode())
    return cache_dir() / "kernels" / f"lstm_cpu-{key.hexdigest()[:16]}.so"


def build() -> pathlib.Path:
    """The compiled library, built here once per source, jaxlib version and compiler."""
    compiler = _compiler()
    library = _library_path(compiler)
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(library) as tmp:  # processes building at once each leave a whole library
        done = subprocess.run([compiler, *_flags(), "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp)],
                              capture_output=True, text=True)
        if done.returncode:
            lines = done.stderr.strip().splitlines() or ["no output"]
            last = next((line for line in lines if "error" in line), lines[-1]).strip()
            raise KernelError(f"compiling {SOURCE.name} failed ({last}); "
                              "set --config.model.lstm_backend=scan to train without it")
    return library


@functools.cache
def _registration() -> KernelError | None:
    """Builds (if needed), loads and registers both custom calls with XLA, once per process: a failed
    build is not retried by every model built later."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except KernelError as e:
        return e
    jax.ffi.register_ffi_target(TARGETS["forward"], jax.ffi.pycapsule(library.LstmForward), platform="cpu")
    jax.ffi.register_ffi_target(TARGETS["backward"], jax.ffi.pycapsule(library.LstmBackward), platform="cpu")
    return None


def register() -> None:
    """Makes both custom calls available, or raises the KernelError that says why they are not."""
    if error := _registration():
        raise error


def builds() -> bool:
    """Whether the kernel can be built and loaded here; says why not in the log."""
    try:
        register()
    except KernelError as e:
        logging.warning("%s; the LSTM runs on the scan", e)
        return False
    return True


def threads_per_device() -> int:
    """The cores each CPU device has to itself: one with `--cpu_devices` (a single-threaded device per
    core), all of them for JAX's one default CPU device. The kernel splits its rows over that many threads."""
    return max(1, cpu_setup.usable_cores() // jax.local_device_count("cpu"))


def varying_like(outputs, like: jax.Array):
    """`outputs` typed as varying over the manual mesh axes `like` varies over (inside shard_map),
    as a custom call's results are not."""
    axis_type = getattr(jax.typeof(like), "manual_axis_type", None)
    axes = tuple(sorted(axis_type.varying)) if axis_type is not None else ()
    return jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), outputs) if axes else outputs


def projects_per_step(dtype) -> bool:
    """Whether the kernel makes the input projection x_t @ W_x itself, step by step: for bfloat16 on
    AMX tiles, where that costs less than reading back a [T, B, 4H] projection made by XLA. Elsewhere
    XLA's one large matmul over all steps is faster."""
    return jnp.dtype(dtype) == jnp.bfloat16 and {"amx_bf16", "amx_tile"} <= cpu_setup.machine_flags()


def lstm_forward(x: jax.Array, w_x: jax.Array, b: jax.Array, w_h: jax.Array, mask: jax.Array, reverse: bool):
    """(outputs, final, h_prev, cs, gates) of the masked LSTM steps over x [T, B, E] (float32 or
    bfloat16: the matmuls' dtype), w_x [E, 4H], bias [4H], w_h [H, 4H], mask [T, B]. outputs [T, B, H]
    are h after each step, zero where masked, and h_prev the carry h each step started from, both in
    x's dtype; final [B, H] is the last carry, cs [T, B, H] the cell state after each step and gates
    [T, B, 4H] the activated i, f, g, o, in float32. In bfloat16 the per-step matmuls run on AMX tiles
    (float32 sums) where the CPU has them, E and H are multiples of 32 and each thread's rows of 16;
    in float32 on bfloat16-rounded operands elsewhere."""
    register()
    steps, batch, _ = x.shape
    hidden = w_h.shape[0]
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    carries = jax.ShapeDtypeStruct((steps, batch, hidden), x.dtype)
    results = (carries, f32((batch, hidden)), carries, f32(carries.shape), f32((steps, batch, 4 * hidden)))
    call = jax.ffi.ffi_call(TARGETS["forward"], results)
    projected = not projects_per_step(x.dtype)
    if projected:
        x = jnp.matmul(x, w_x.astype(x.dtype), preferred_element_type=jnp.float32)
    f = lambda a: a.astype(jnp.float32)
    outputs = call(x, f(w_x), f(b), f(w_h), mask.astype(bool), projected=projected, reverse=bool(reverse),
                   threads=np.int64(threads_per_device()))
    return varying_like(outputs, x)


def lstm_backward(gates, cs, d_outputs, d_final, mask, w_h, reverse: bool, dtype) -> tuple[jax.Array, jax.Array]:
    """(dz [T, B, 4H] in `dtype`, its float32 sum over steps and rows [4H], the bias's gradient): the
    cotangents of the gate pre-activations, from the forward's gates and cs, the outputs' cotangents
    (float32 or bfloat16) and the final state's, and w_h [H, 4H]."""
    register()
    call = jax.ffi.ffi_call(TARGETS["backward"], (jax.ShapeDtypeStruct(gates.shape, dtype),
                                                  jax.ShapeDtypeStruct(gates.shape[-1:], jnp.float32)))
    f32 = lambda a: a.astype(jnp.float32)
    outputs = call(f32(gates), f32(cs), d_outputs, f32(d_final), mask.astype(bool), f32(w_h).T,
                   reverse=bool(reverse), threads=np.int64(threads_per_device()))
    return varying_like(outputs, gates)
