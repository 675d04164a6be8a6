"""The training state, its initialisation into shardings, and what a checkpoint holds of it.

A checkpoint step has two array items: `model` (what eval and serving read: the averaged
params when train.ema_decay is on, and the non-trainable state) and `train` (what only
resuming needs). `model_shapes` describes the model item without building an optimizer,
so `runs.load` restores parameters alone onto any mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sentiment_jax import losses, models, optimizer, sharding
from sentiment_jax.models.from_data import TrainingData


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable variables (nnx.Param)
    rest: nnx.State  # other model variables, e.g. BatchNorm statistics, fixed feature weights
    opt_state: Any
    rng: jax.Array  # base key; the key of step s is fold_in(rng, s), so resuming is exact
    ema: nnx.State | None = None  # moving average of params (train.ema_decay > 0), what eval and serving use


@dataclasses.dataclass
class ModelShapes:
    """A model's graph and the shapes and shardings of its variables, without any values."""

    build: Callable[[], nnx.Module]
    graphdef: Any
    params: nnx.State  # ShapeDtypeStructs
    rest: nnx.State
    param_sharding: Any
    rest_sharding: Any

    def restore_target(self) -> dict:
        """The `model` checkpoint item as shape/dtype/sharding stand-ins, for a restore onto this mesh."""
        target = lambda tree, shard: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shard)
        return {"params": target(self.params, self.param_sharding), "rest": target(self.rest, self.rest_sharding)}


def model_shapes(cfg, mesh, input_size: int, num_classes: int) -> ModelShapes:
    """`input_size`: the vocabulary size of a token model, the feature width of a feature model."""
    outputs = losses.num_outputs(cfg, num_classes)
    build = lambda: models.build_model(cfg.model, input_size, outputs, nnx.Rngs(params=cfg.seed))
    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    return ModelShapes(build, graphdef, params, rest, sharding.state_shardings(params, mesh, cfg.mesh),
                       sharding.state_shardings(rest, mesh, cfg.mesh))


@dataclasses.dataclass
class Setup:
    """The static parts of a run: graph, optimizer, mesh and shardings."""

    graphdef: Any
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    state_sharding: Any
    batch_sharding: jax.sharding.NamedSharding
    mesh_config: Any = None  # for activation constraints (sharding.constrain)


def create_state(cfg, mesh, input_size: int, num_classes: int, total_steps: int,
                 data: TrainingData | None = None) -> tuple[TrainState, Setup]:
    """Initialises parameters directly into their shardings and the optimizer state beside them.

    With `data`, a model's own `from_data` hook takes what it needs of the training data
    (fixed feature statistics, a pretrained embedding table) inside the initialisation.
    """
    shapes = model_shapes(cfg, mesh, input_size, num_classes)
    if data is not None and data.embeddings is not None:
        table = getattr(getattr(shapes.params, "embed", None), "embedding", None)
        if table is None or table.shape != data.embeddings.shape:
            raise ValueError(f"pretrained embeddings {data.embeddings.shape} do not fit model '{cfg.model.name}' "
                             f"(its table: {None if table is None else table.shape}); set pretrain.embeddings 'none'")

    @functools.partial(jax.jit, out_shardings=(shapes.param_sharding, shapes.rest_sharding))
    def init():
        model = shapes.build()
        if data is not None and hasattr(model, "from_data"):
            model.from_data(data)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return params, rest

    params, rest = init()
    tx = optimizer.make_optimizer(cfg, total_steps)
    replicated = sharding.replicated(mesh)
    # tx.init's outputs do not depend on the values of params, so jit would leave them on one
    # device: moments take their parameter's sharding, counters are replicated.
    opt_sharding = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), shapes.param_sharding,
                                         transform_non_params=lambda _: replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
    # The average starts as a copy of the initial params (fresh buffers, same shardings).
    ema = jax.tree.map(lambda x: x.copy(), params) if cfg.train.ema_decay else None
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params, rest=rest,
                       opt_state=opt_state, rng=jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)),
                                                               replicated), ema=ema)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return state, Setup(shapes.graphdef, tx, mesh, state_sharding, sharding.batch_sharding(mesh, cfg.mesh), cfg.mesh)


def model_item(state: TrainState) -> dict:
    """What eval and serving need from a checkpoint: the averaged params when train.ema_decay is on,
    so every reader of a checkpoint (eval, predict, serving) uses them without knowing about the average."""
    return {"params": state.params if state.ema is None else state.ema, "rest": state.rest}


def train_item(state: TrainState) -> dict:
    """What only resuming needs; with the average on, that includes the raw params being trained."""
    item = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    return item if state.ema is None else {**item, "params": state.params}


def state_from_items(model: dict, train: dict) -> TrainState:
    """The inverse of model_item and train_item."""
    if "params" in train:
        return TrainState(ema=model["params"], rest=model["rest"], **train)
    return TrainState(params=model["params"], rest=model["rest"], **train)


def parameter_counts(state: TrainState) -> dict[str, int]:
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return {"trainable_params": count(state.params), "total_params": count(state.params) + count(state.rest)}
