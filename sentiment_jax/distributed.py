"""Joining a multi-process run (TPU pod slice, GPU cluster, or N CPU processes on one machine).

JAX is multi-controller: every host runs this same program as one process, and after
`jax.distributed.initialize` `jax.devices()` lists the devices of all processes, so the
mesh, the jitted steps and Orbax checkpoints span them with no other change. Each process
feeds only its own rows of every global batch (`input_pipeline.Batches`,
`sharding.put_batch`) and only process 0 writes logs.
"""

from __future__ import annotations

import os

import jax


def cluster_detected() -> bool:
    """True where `jax.distributed.initialize()` can find its peers alone: SLURM with
    several tasks, or a Cloud TPU VM (whose metadata names the slice's workers)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    try:  # JAX's own check (a file test, no network); private, so guarded
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the run before any JAX computation; a no-op for a plain single-process run.

    Explicit arguments (all three) win; otherwise the cluster is auto-detected.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(a is not None for a in explicit):
        if any(a is None for a in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif cluster_detected():
        jax.distributed.initialize()


def sync(name: str) -> None:
    """Waits until every process reaches this point (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def describe() -> str:
    return (f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} {jax.default_backend()} devices")
