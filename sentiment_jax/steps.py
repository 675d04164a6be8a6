"""The jitted step functions: one train step and one predict step, with explicit shardings.

They are pure: they take the model's variables as `nnx.State`, merge them with the static
graph inside `jax.jit`, and return new values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from sentiment_jax import input_pipeline, losses, sharding
from sentiment_jax.state import Setup, TrainState

# first_nonfinite: the first step whose loss or new state was NaN/inf, 0 while there is none; carried with the
# sums so that it is read exactly when they are, at no extra transfer.
METRIC_KEYS = ("loss_sum", "correct", "count", "first_nonfinite")


def zero_metrics(mesh) -> dict[str, jax.Array]:
    return {k: jax.device_put(jnp.zeros((), jnp.float32), sharding.replicated(mesh)) for k in METRIC_KEYS}


def make_train_step(setup: Setup, confidence_penalty: float = 0.0, class_weights: np.ndarray | None = None,
                    ema_decay: float = 0.0):
    """`class_weights` [K]: each example's loss is scaled by its class's weight (reported losses are not).
    `ema_decay` d > 0: state.ema after step t is the average of the params after steps 1..t with weights
    proportional to d^(t-s), i.e. the debiased exponential moving average, so the initial params get no weight."""
    graphdef, tx = setup.graphdef, setup.tx

    def train_step(state: TrainState, batch: dict, sums: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            # copy=True: fresh Variables in this trace, so BatchNorm may update its statistics.
            model = nnx.merge(graphdef, params, state.rest, copy=True)
            with sharding.activation_rules(setup.mesh, setup.mesh_config):
                logits = model(batch["ids"], batch["mask"], deterministic=False, rngs=nnx.Rngs(dropout=key))
            per_example = losses.per_example_loss(logits, batch["label"], confidence_penalty) * batch["weight"]
            scaled = per_example if class_weights is None else per_example * jnp.asarray(class_weights)[batch["label"]]
            loss = jnp.sum(scaled) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (logits, per_example, rest)

        (_, (logits, per_example, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema_decay:  # e_t = e_(t-1) + (1 - d) / (1 - d^t) (p_t - e_(t-1)); e_1 = p_1
            rate = (1 - ema_decay) / (1 - ema_decay ** (state.step + 1).astype(jnp.float32))
            ema = jax.tree.map(lambda e, p: e + rate.astype(e.dtype) * (p - e), state.ema, params)
        correct = (losses.predictions(logits) == batch["label"]) * batch["weight"]
        # train.check_finite stops the run at the host's next read of the sums, naming first_nonfinite.
        finite = jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(),
                                                               (per_example, params, rest, opt_state)))
        first = sums["first_nonfinite"]
        sums = {"loss_sum": sums["loss_sum"] + jnp.where(finite, jnp.sum(per_example), jnp.nan),
                "correct": sums["correct"] + jnp.sum(correct), "count": sums["count"] + jnp.sum(batch["weight"]),
                "first_nonfinite": jnp.where((first > 0) | finite, first, (state.step + 1).astype(jnp.float32))}
        return state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state, ema=ema), sums

    metric_sharding = {k: sharding.replicated(setup.mesh) for k in METRIC_KEYS}
    return jax.jit(train_step, in_shardings=(setup.state_sharding, setup.batch_sharding, metric_sharding),
                   out_shardings=(setup.state_sharding, metric_sharding), donate_argnums=(0, 2))


def forward_fn(graphdef, mesh=None, mesh_config=None):
    """The pure (params, rest, ids, mask) -> class probabilities [B, K] of a model graph."""

    def forward(params, rest, ids, mask):
        with sharding.activation_rules(mesh, mesh_config):
            return losses.probabilities(nnx.merge(graphdef, params, rest)(ids, mask, deterministic=True))

    return forward


_PREDICT_STEPS: dict = {}


def _hashable(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def make_predict_step(graphdef, mesh, mesh_config, param_sharding, rest_sharding, batch_sharding):
    """`forward_fn` jitted with explicit shardings; the probabilities come back replicated on every device.

    One jitted step per (graph, layout) in a process, so validation, the end-of-training report
    and every later restore of the same run (eval, serving, ensembles) share its compilations.
    """
    key = (graphdef, mesh, mesh_config and mesh_config.to_json(), batch_sharding, _hashable(param_sharding),
           _hashable(rest_sharding))
    if key not in _PREDICT_STEPS:
        _PREDICT_STEPS[key] = jax.jit(forward_fn(graphdef, mesh, mesh_config),
                                      in_shardings=(param_sharding, rest_sharding, batch_sharding, batch_sharding),
                                      out_shardings=sharding.replicated(mesh))
    return _PREDICT_STEPS[key]


def predict_probabilities(predict_step, params, rest, batches: input_pipeline.Batches, batch_sharding,
                          progress: str | None = None) -> np.ndarray:
    """Probabilities [N, K] for a whole split, row i for example i (batch order may differ)."""
    out = None
    for indices in tqdm(batches.order(0), desc=progress, disable=progress is None or jax.process_index() != 0,
                        leave=False, mininterval=2):
        batch = batches.batch(indices)
        arrays = sharding.put_batch({"ids": batch["ids"], "mask": batch["mask"]}, batch_sharding)
        probs = np.asarray(predict_step(params, rest, arrays["ids"], arrays["mask"]))
        if out is None:
            out = np.zeros((len(batches.split), probs.shape[-1]), np.float32)
        out[indices[indices >= 0]] = probs[indices >= 0]
    return out
