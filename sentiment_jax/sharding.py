"""Mesh and shardings from config: the code never hard-codes a device count.

Parameters are annotated with logical axis names where they are created (e.g. an
embedding is ("vocab", "embed")); `config.mesh.logical_axis_rules` maps those names to
mesh axes. Data parallel, FSDP or tensor parallel are then different rules or mesh
shapes, not code (see `config_base.LAYOUTS`). Activations use the same names plus
"batch", which always maps to `config.mesh.data_axes`.
"""

from __future__ import annotations

import contextlib
import math
import os

import jax
import numpy as np
from flax import nnx
from flax.linen import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def use_cpu_devices(n: int) -> None:
    """Split the host CPU into `n` devices that each run their ops on one thread.

    An LSTM step's per-timestep matmuls are too small to share across threads. With one device
    per core and the batch sharded over them, each core runs its part of the batch without
    synchronising every timestep. On 2 cores: 1.15x the LSTM training speed of one multi-threaded
    device, 1.5x together with huge-page malloc (docs/results.md § Speed).
    Call before JAX first touches its devices.
    """
    jax.config.update("jax_num_cpu_devices", n)
    single_thread = "--xla_cpu_multi_thread_eigen=false"
    flags = os.environ.get("XLA_FLAGS", "")
    if single_thread not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {single_thread}".strip()


def make_mesh(cfg) -> Mesh:
    """A mesh with `cfg.axes` named axes; one -1 in `cfg.shape` takes the remaining devices.

    `cfg.num_devices` > 0 uses only the first that many devices (e.g. 1 of 8 simulated).
    """
    devices = jax.devices()
    if cfg.num_devices:
        if cfg.num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={cfg.num_devices} but only {len(devices)} devices exist")
        devices = devices[: cfg.num_devices]
    shape = list(cfg.shape)
    if len(shape) != len(cfg.axes):
        raise ValueError(f"mesh.shape {tuple(shape)} and mesh.axes {tuple(cfg.axes)} differ in length")
    if shape.count(-1) > 1:
        raise ValueError("mesh.shape may contain at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // max(known, 1)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh.shape {tuple(cfg.shape)} needs {math.prod(shape)} devices but "
                         f"{len(devices)} are available; fix --config.mesh.shape")
    return Mesh(np.asarray(devices).reshape(shape), tuple(cfg.axes))


def rules(cfg) -> tuple[tuple[str, object], ...]:
    """The config's rules, led by "batch" -> the data-parallel axes."""
    return (("batch", tuple(cfg.data_axes)),) + tuple(
        (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in cfg.logical_axis_rules)


def logical_to_sharding(logical: P, mesh: Mesh, cfg) -> NamedSharding:
    return NamedSharding(mesh, spmd.logical_to_mesh_axes(tuple(logical), rules(cfg)) or P())


def state_shardings(state: nnx.State, mesh: Mesh, cfg):
    """NamedShardings for an nnx.State (or its abstract version), from the logical annotations.

    A dimension that the mapped mesh axes do not divide (e.g. a vocabulary of 20,003 rows
    over 8 devices) stays replicated rather than failing.
    """
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda p, x: fit(logical_to_sharding(p, mesh, cfg), x.shape), specs, state,
                        is_leaf=lambda x: isinstance(x, P))


def fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """Drops the mesh axes of any dimension whose size they do not divide."""
    sizes = sharding.mesh.shape
    spec = []
    for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        spec.append(axes if dim % math.prod(sizes[a] for a in names) == 0 else None)
    return NamedSharding(sharding.mesh, P(*spec))


_ACTIVE: list = []  # (mesh, config) while a step function is traced


@contextlib.contextmanager
def activation_rules(mesh: Mesh, cfg):
    """Makes `constrain` active while tracing a step function for `mesh` (cfg None: inactive)."""
    if cfg is None:
        yield
        return
    _ACTIVE.append((mesh, cfg))
    try:
        yield
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
    """Pins an activation's layout by logical names, e.g. ("batch", "length", "embed").

    Without it the compiler may keep, say, an FSDP-sharded embedding's layout for the
    looked-up activations. A no-op outside `activation_rules` (plain eager or unsharded use).
    """
    if not _ACTIVE:
        return x
    mesh, cfg = _ACTIVE[-1]
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(P(*logical), mesh, cfg))


def map_batch_shards(fn, replicated, *batched):
    """fn(replicated, *batched) run on each device's rows of the batch-leading `batched` arrays.

    For ops the compiler cannot partition itself (custom calls such as cuDNN's LSTM), which
    it would otherwise run on the gathered global batch. Plain call outside `activation_rules`.
    """
    if not _ACTIVE:
        return fn(replicated, *batched)
    mesh, cfg = _ACTIVE[-1]
    rows = P(tuple(cfg.data_axes))
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(),) + (rows,) * len(batched), out_specs=rows)(
        replicated, *batched)


def batch_sharding(mesh: Mesh, cfg) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel mesh axes."""
    return NamedSharding(mesh, P(tuple(cfg.data_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's rows into global arrays (one process or many). With one process, one
    batched transfer: it takes half the host time, which on a small CPU is taken from the step."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
