"""Mesh and shardings from config: the code never hard-codes a device count.

Parameters are annotated with logical axis names where they are created (e.g. an
embedding is ("vocab", "embed")); `config.mesh.logical_axis_rules` maps those names to
mesh axes. Data parallel, FSDP or tensor parallel are then different rules, not code.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from flax.linen import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(cfg) -> Mesh:
    """A mesh with `cfg.axes` named axes; one -1 in `cfg.shape` takes the remaining devices.

    `cfg.num_devices` > 0 uses only the first that many devices (e.g. 1 of 8 simulated).
    """
    devices = jax.devices()
    if cfg.get("num_devices"):
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
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                 for name, axes in cfg.logical_axis_rules)


def logical_to_sharding(logical: P, mesh: Mesh, cfg) -> NamedSharding:
    return NamedSharding(mesh, spmd.logical_to_mesh_axes(tuple(logical), rules(cfg)) or P())


def state_shardings(state: nnx.State, mesh: Mesh, cfg):
    """NamedShardings for an nnx.State (or its abstract version), from the logical annotations."""
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda p: logical_to_sharding(p, mesh, cfg), specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, cfg) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel mesh axes."""
    return NamedSharding(mesh, P(tuple(cfg.data_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's rows into global arrays (one process or many)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
