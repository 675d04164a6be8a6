"""The optimizer of a training run: AdamW with warmup, a decay schedule and gradient clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate(cfg, total_steps: int) -> optax.ScalarOrSchedule:
    """train.schedule as optax takes it: a constant stays a float, so its optimizer state holds no step count."""
    t = cfg.train
    warmup = max(int(t.warmup_fraction * total_steps), 1)
    if t.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, warmup, max(total_steps, warmup + 1),
                                                t.learning_rate * t.final_lr_fraction)
    elif t.schedule == "linear":
        lr = optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, warmup),
                                   optax.linear_schedule(t.learning_rate, t.learning_rate * t.final_lr_fraction,
                                                         max(total_steps - warmup, 1))], [warmup])
    elif t.schedule == "constant":
        lr = t.learning_rate
    else:
        raise ValueError(f"unknown train.schedule '{t.schedule}'; choose cosine, linear or constant")
    return lr


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    t, lr = cfg.train, learning_rate(cfg, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # kernels, not biases
    return optax.chain(optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
                       optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))
