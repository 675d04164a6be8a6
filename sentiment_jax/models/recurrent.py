"""Recurrent text classifiers: LSTM, GRU and SimpleRNN cells on one masked-scan machinery.

Variable length is exact for either padding side: a padded step leaves the carry
unchanged and emits zeros, so the forward direction ends on each sequence's own last
token and the reverse scan (`lax.scan(reverse=True)`) starts there. No flipping of ragged
sequences is needed, and padding can never change a prediction.

The input projection `x @ W_x` of every time step is one large matmul outside the scan;
only `h @ W_h` stays inside. Gate order follows PyTorch (LSTM: i, f, g, o;
GRU: r, z, n) so weights can be compared one to one.

On GPUs an LSTM layer can instead run cuDNN's fused kernel (`lstm_backend="cudnn"`, see
`cudnn_layer`); the scan stays the path every platform has and the one it is tested against.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sentiment_jax import cpu_kernels, sharding
from sentiment_jax.models.from_data import TrainingData, start_embeddings
from sentiment_jax.models.pooling import AttentionPool, masked_pool

Carry = tuple[jax.Array, ...]


def _param(rngs: nnx.Rngs, init, shape, axes, dtype=jnp.float32) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


class _Cell(nnx.Module):
    """Shared parameters: input kernel [in, G*H], recurrent kernel [H, G*H], bias [G*H]."""

    num_gates: int

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        width = self.num_gates * hidden
        self.input_kernel = _param(rngs, nnx.initializers.glorot_uniform(), (in_features, width),
                                   ("embed", "gates"))
        self.recurrent_kernel = _param(rngs, _orthogonal_per_gate(self.num_gates), (hidden, width),
                                       ("hidden", "gates"))
        self.bias = _param(rngs, nnx.initializers.zeros_init(), (width,), ("gates",))

    def project(self, x: jax.Array) -> jax.Array:
        """Input contribution for all steps at once: [B, T, in] -> [B, T, G*H]."""
        return x @ self.input_kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)

    def initial_carry(self, batch: int, dtype) -> Carry:
        return (jnp.zeros((batch, self.hidden), dtype),)

    @staticmethod
    def output(carry: Carry) -> jax.Array:
        return carry[0]


class LSTMCell(_Cell):
    num_gates = 4

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        super().__init__(in_features, hidden, rngs=rngs)
        # Forget-gate bias 1: remember by default early in training.
        self.bias[...] = self.bias[...].at[hidden:2 * hidden].set(1.0)

    def initial_carry(self, batch: int, dtype) -> Carry:
        zeros = jnp.zeros((batch, self.hidden), dtype)
        return (zeros, zeros)

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(input kernel, bias, recurrent kernel), as `lstm_direction` takes them."""
        return self.input_kernel[...], self.bias[...], self.recurrent_kernel[...]

    def step(self, carry: Carry, xp: jax.Array, w_h: jax.Array) -> Carry:
        h, c = carry
        i, f, g, o = jnp.split(xp + h @ w_h, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return (jax.nn.sigmoid(o) * jnp.tanh(c), c)


class GRUCell(_Cell):
    num_gates = 3

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        super().__init__(in_features, hidden, rngs=rngs)
        # The candidate gate needs its recurrent bias inside the reset product.
        self.recurrent_bias = _param(rngs, nnx.initializers.zeros_init(), (3 * hidden,), ("gates",))

    def step(self, carry: Carry, xp: jax.Array, w_h: jax.Array) -> Carry:
        (h,) = carry
        hp = h @ w_h + self.recurrent_bias[...].astype(h.dtype)
        xr, xz, xn = jnp.split(xp, 3, axis=-1)
        hr, hz, hn = jnp.split(hp, 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        return ((1.0 - z) * n + z * h,)


class SimpleRNNCell(_Cell):
    num_gates = 1

    def step(self, carry: Carry, xp: jax.Array, w_h: jax.Array) -> Carry:
        return (jnp.tanh(xp + carry[0] @ w_h),)


CELLS = {"lstm": LSTMCell, "gru": GRUCell, "rnn": SimpleRNNCell}


def _orthogonal_per_gate(num_gates: int):
    """Orthogonal init for each gate's [H, H] block of the recurrent kernel."""
    ortho = nnx.initializers.orthogonal()

    def init(key, shape, dtype=jnp.float32):
        hidden = shape[0]
        keys = jax.random.split(key, num_gates)
        return jnp.concatenate([ortho(k, (hidden, hidden), dtype) for k in keys], axis=1)

    return init


def scan_direction(cell: _Cell, x: jax.Array, mask: jax.Array, *, reverse: bool,
                   unroll: int = 1) -> tuple[jax.Array, jax.Array]:
    """Runs one direction over [B, T, F] with a [B, T] mask; returns (final h [B,H], outputs [B,T,H])."""
    if isinstance(cell, LSTMCell):
        return lstm_direction(cell.weights(), x, mask, reverse=reverse, unroll=unroll)
    return generic_scan(cell, x, mask, reverse=reverse, unroll=unroll)


def lstm_direction(weights, x: jax.Array, mask: jax.Array, *, reverse: bool, unroll: int = 1,
                   backend: str = "scan") -> tuple[jax.Array, jax.Array]:
    """One LSTM direction from its (input kernel, bias, recurrent kernel), as `scan_direction`."""
    w_x, b, w_h = weights
    # Time-major by transposing x, not the 4x wider projection.
    final, outputs = _lstm_scan(x.swapaxes(0, 1), w_x, b, mask.T, w_h, reverse, unroll, backend)
    return final.astype(x.dtype), outputs.swapaxes(0, 1)


def generic_scan(cell: _Cell, x: jax.Array, mask: jax.Array, *, reverse: bool,
                 unroll: int = 1) -> tuple[jax.Array, jax.Array]:
    """Any cell, differentiated by JAX: the reference the LSTM fast path is tested against."""
    xp = cell.project(x)
    w_h = cell.recurrent_kernel[...].astype(x.dtype)
    carry = cell.initial_carry(x.shape[0], x.dtype)

    def body(carry, inputs):
        xp_t, m_t = inputs
        new = cell.step(carry, xp_t, w_h)
        m = m_t[:, None]
        carry = tuple(jnp.where(m, n, o) for n, o in zip(new, carry))
        h = cell.output(carry)
        return carry, jnp.where(m, h, jnp.zeros_like(h))

    carry, outputs = jax.lax.scan(body, carry, (xp.swapaxes(0, 1), mask.T), reverse=reverse,
                                  unroll=unroll)
    return cell.output(carry), outputs.swapaxes(0, 1)


# ---------------------------------------------------------------------------------------
# LSTM fast path: one hand-written VJP for the input projection and the scan together.
#
# Autodiff of the scan accumulates dW_h inside the backward loop, a second small matmul
# per step. The VJP below leaves one matmul per step in the loop (dz @ W_h^T); afterwards
# dW_x and dW_h come from two large matmuls over all steps, x^T @ dz and h_prev^T @ dz, and
# dx from dz @ W_x^T. Arrays are time-major: x [T, B, E], mask [T, B], so every per-step slice is
# contiguous. The bias is added inside the step, where it fuses with the gate math.
#
# Mixed precision: the matmul operands take x's dtype (bfloat16 doubles GEMM speed on CPUs
# with AVX512-BF16 and on TPUs) and accumulate in float32. Gates, cell state and the carried
# cotangents stay float32; the weights come in as float32, so their gradients do too. The
# large matmuls' operands h_prev and dz, and the input's cotangent, take x's dtype.


def _matmul(a, b):
    """a @ b with b's dtype for both operands and a float32 result."""
    return jnp.matmul(a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def _gate_constants(hidden: int, dtype):
    """Per-column (scale, shift) so one sigmoid gives all four gates: tanh(z) = 2*sigmoid(2z) - 1."""
    ones, zeros = jnp.ones(hidden, dtype), jnp.zeros(hidden, dtype)
    scale = jnp.concatenate([ones, ones, 2 * ones, ones])
    shift = jnp.concatenate([zeros, zeros, -ones, zeros])
    return scale, shift


def _lstm_forward(x, w_x, b, mask, w_h, reverse, unroll, backend, keep_residuals):
    """((final h, outputs), residuals): the residuals (h_prev, cs, gates) are the carry h each step
    started from, in x's dtype as the weight gradient's matmul takes it, and the float32 cell states
    and activated gates."""
    w_x, w_h = w_x.astype(x.dtype), w_h.astype(x.dtype)
    if backend == "cpu_kernel":  # the projection and the steps below, the steps as one custom call
        outputs, final, h_prev, cs, gates = cpu_kernels.lstm_forward(x, w_x, b, w_h, mask, reverse)
        return (final, outputs), (h_prev, cs, gates)
    xp = _matmul(x, w_x)
    zeros = jnp.zeros(x.shape[1:-1] + (w_h.shape[0],), jnp.float32)
    scale, shift = _gate_constants(w_h.shape[0], jnp.float32)

    def body(carry, inputs):
        h, c = carry
        xp_t, m_t = inputs
        # One elementwise pass over all 4H gate columns, materialised once, then shared by c and h:
        # cheaper on CPU than four separate activations that XLA fuses into c and h twice over.
        gates = jax.nn.sigmoid((xp_t + _matmul(h, w_h) + b) * scale) * scale + shift
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        m = m_t[..., None]
        c_new = jnp.where(m, f * c + i * g, c)
        h_new = jnp.where(m, o * jnp.tanh(c_new), h)
        # Few stacked outputs: each is a [T, ...] buffer written every step.
        return (h_new, c_new), (h_new, c_new, gates) if keep_residuals else h_new

    (h, _), ys = jax.lax.scan(body, (zeros, zeros), (xp, mask), reverse=reverse, unroll=unroll)
    hs = ys[0] if keep_residuals else ys
    out = (h, jnp.where(mask[..., None], hs, 0).astype(x.dtype))
    return out, ((_previous(hs, reverse).astype(x.dtype), *ys[1:]) if keep_residuals else None)


def _previous(seq, reverse):
    """The carry each step started from: seq one step earlier in scan order, zeros first."""
    zeros = jnp.zeros_like(seq[:1])
    return jnp.concatenate([seq[1:], zeros]) if reverse else jnp.concatenate([zeros, seq[:-1]])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lstm_scan(x, w_x, b, mask, w_h, reverse, unroll, backend):
    """(final h [B, H], outputs [T, B, H]) of x [T, B, E]; zero outputs on padded steps."""
    return _lstm_forward(x, w_x, b, mask, w_h, reverse, unroll, backend, keep_residuals=False)[0]


def _lstm_scan_fwd(x, w_x, b, mask, w_h, reverse, unroll, backend):
    out, saved = _lstm_forward(x, w_x, b, mask, w_h, reverse, unroll, backend, keep_residuals=True)
    return out, (saved, x, mask, w_x, w_h)


def _lstm_scan_bwd(reverse, unroll, backend, residuals, cotangents):
    (h_prev, cs, gates), x, mask, w_x, w_h = residuals
    d_final, d_outputs = cotangents
    d_final = d_final.astype(jnp.float32)
    w_t = w_h.T.astype(x.dtype)

    def body(carry, inputs):
        dh, dc = carry  # cotangents of the carry after this step
        gates_t, c_t, c_prev_t, d_out_t, m_t = inputs
        m = m_t[..., None]
        i, f, g, o = jnp.split(gates_t, 4, axis=-1)
        tanh_c = jnp.tanh(c_t)
        dh = dh + jnp.where(m, d_out_t, 0)
        dh_step, dc_step = jnp.where(m, dh, 0), jnp.where(m, dc, 0)  # a padded step passes both through
        dc_new = dc_step + dh_step * o * (1 - tanh_c ** 2)
        dz = jnp.concatenate([dc_new * g * i * (1 - i), dc_new * c_prev_t * f * (1 - f),
                              dc_new * i * (1 - g ** 2), dh_step * tanh_c * o * (1 - o)], axis=-1)
        return (_matmul(dz, w_t) + dh - dh_step, dc_new * f + dc - dc_step), dz

    if backend == "cpu_kernel":  # dz already in x's dtype, and its sum
        dz, d_b = cpu_kernels.lstm_backward(gates, cs, d_outputs, d_final, mask, w_h, reverse, x.dtype)
    else:
        _, dz = jax.lax.scan(body, (d_final, jnp.zeros_like(d_final)),
                             (gates, cs, _previous(cs, reverse), d_outputs.astype(jnp.float32), mask),
                             reverse=not reverse, unroll=unroll)
        d_b = dz.sum((0, 1))
    # Contract over time and batch together. No reshape to [T*B, ...]: with the batch sharded over
    # devices that reshape would force an all-gather, where this needs one all-reduce. Two products,
    # not one of [x, h_prev]: XLA's CPU backend would build that concatenation in float32.
    dz = dz.astype(x.dtype)
    d_w = [jax.lax.dot_general(a, dz, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32)
           for a in (x, h_prev)]
    d_x = _matmul(dz, w_x.T.astype(x.dtype)).astype(x.dtype)
    return d_x, d_w[0], d_b, None, d_w[1]


_lstm_scan.defvjp(_lstm_scan_fwd, _lstm_scan_bwd)


# ---------------------------------------------------------------------------------------
# cuDNN path: one fused kernel call per layer (jax.experimental.rnn, CUDA GPUs only).
#
# cuDNN wants each row's tokens to start at position 0 and a length per row. Rows are
# rotated so their real tokens come first (either padding side works), run, and rotated
# back; padded outputs are zeroed, as the scan does. The kernel only exists on GPUs, so
# tests run this wrapper with JAX's reference implementation of the same kernel in its place.

BACKENDS = ("scan", "cudnn", "cpu_kernel", "auto")


def cudnn_available() -> bool:
    return jax.default_backend() == "gpu"


def _cudnn_kernel(x, h0, c0, weights, lengths, *, input_size, hidden_size, bidirectional):
    from jax.experimental import rnn

    return rnn.lstm(x, h0, c0, weights, lengths, input_size=input_size, hidden_size=hidden_size,
                    num_layers=1, dropout=0.0, bidirectional=bidirectional)


def cudnn_weights(cells: Sequence[LSTMCell]) -> jax.Array:
    """Flat float32 weights in cuDNN's order: each direction's W_ih [4H, in] and W_hh [4H, H], then
    each direction's b_ih and b_hh (zeros: our one bias already sums the two)."""
    kernels = [w for c in cells for w in (c.input_kernel[...].T, c.recurrent_kernel[...].T)]
    biases = [b for c in cells for b in (c.bias[...], jnp.zeros_like(c.bias[...]))]
    return jnp.concatenate([a.reshape(-1) for a in kernels + biases]).astype(jnp.float32)


def _rotate(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Row b of x [B, T, ...] rotated left by shift[b] steps."""
    index = (jnp.arange(x.shape[1])[None] + shift[:, None]) % x.shape[1]
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def cudnn_layer(weights: jax.Array, x: jax.Array, mask: jax.Array, *, hidden: int, bidirectional: bool,
                kernel=None) -> tuple[jax.Array, jax.Array]:
    """One layer (flat `cudnn_weights`) as one cuDNN call in float32: (final [B, D], outputs [B, T, D]).

    Same results as the scan for any mask whose real tokens are contiguous in each row, which is
    what the input pipeline makes. `kernel` stands in for cuDNN in tests.
    """
    kernel = kernel or _cudnn_kernel
    lengths = mask.sum(axis=1, dtype=jnp.int32)
    start = jnp.argmax(mask, axis=1)  # first real token; 0 for post-padding
    # zeros_like, not zeros: inside shard_map the initial state must vary over devices like x.
    zeros = jnp.zeros_like(x, jnp.float32, shape=(1 + bidirectional, x.shape[0], hidden))
    outputs, h_n, _ = kernel(_rotate(x.astype(jnp.float32), start), zeros, zeros, weights, jnp.maximum(lengths, 1),
                             input_size=x.shape[-1], hidden_size=hidden, bidirectional=bidirectional)
    outputs = jnp.where(mask[..., None], _rotate(outputs, -start), 0)
    final = jnp.where(lengths[:, None] > 0, jnp.concatenate(list(h_n), axis=-1), 0)
    return final.astype(x.dtype), outputs.astype(x.dtype)


def kernel_layer(weights, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One LSTM layer on the CPU custom calls: `weights` per direction (forward, then backward)."""
    # Typed as varying over the devices like x, so that JAX itself sums the weights' gradients over them.
    weights = cpu_kernels.varying_like(weights, x)
    results = [lstm_direction(w, x, mask, reverse=bool(d), backend="cpu_kernel") for d, w in enumerate(weights)]
    return tuple(jnp.concatenate(parts, axis=-1) for parts in zip(*results))


class RecurrentLayer(nnx.Module):
    """One uni- or bidirectional layer; outputs concatenate [forward, backward] features."""

    def __init__(self, cell: str, in_features: int, hidden: int, bidirectional: bool,
                 *, unroll: int = 1, backend: str = "scan", rngs: nnx.Rngs):
        self.forward = CELLS[cell](in_features, hidden, rngs=rngs)
        self.backward = CELLS[cell](in_features, hidden, rngs=rngs) if bidirectional else None
        self.unroll, self.backend = unroll, backend
        self.out_features = hidden * (2 if bidirectional else 1)

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (final state [B, D], outputs [B, T, D])."""
        cells = [c for c in (self.forward, self.backward) if c is not None]
        if self.backend == "cudnn":
            run = functools.partial(cudnn_layer, hidden=self.forward.hidden, bidirectional=len(cells) == 2)
            # A custom call the compiler cannot split by batch: run it on each device's rows.
            return sharding.map_batch_shards(run, cudnn_weights(cells), x, mask)
        if self.backend == "cpu_kernel":
            # A custom call, like cuDNN's: each device runs it on its own rows.
            return sharding.map_batch_shards(kernel_layer, [c.weights() for c in cells], x, mask)
        final, outputs = scan_direction(self.forward, x, mask, reverse=False, unroll=self.unroll)
        if self.backward is not None:
            final_b, outputs_b = scan_direction(self.backward, x, mask, reverse=True, unroll=self.unroll)
            final = jnp.concatenate([final, final_b], axis=-1)
            outputs = jnp.concatenate([outputs, outputs_b], axis=-1)
        return final, outputs


POOLINGS = ("last", "mean", "max", "mean_max", "attention")


class RecurrentClassifier(nnx.Module):
    """Embedding -> stacked recurrent layers -> pooling -> MLP head -> logits."""

    def __init__(self, *, vocab_size: int, num_outputs: int, cell: str = "lstm", embed_dim: int = 128,
                 hidden_sizes: Sequence[int] = (128,), bidirectional: bool | Sequence[bool] = True,
                 pooling: str = "last", dropout: float = 0.0, embed_dropout: float = 0.0,
                 word_dropout: float = 0.0, head_sizes: Sequence[int] = (), attention_dim: int = 64,
                 unroll: int = 1, backend: str = "scan", dtype=jnp.float32, rngs: nnx.Rngs):
        directions = ([bool(bidirectional)] * len(hidden_sizes) if isinstance(bidirectional, (bool, int))
                      else [bool(b) for b in bidirectional])
        self.dtype = dtype
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(0.1), ("vocab", "embed")))
        layers, width = [], embed_dim
        for hidden, bi in zip(hidden_sizes, directions):
            layers.append(RecurrentLayer(cell, width, hidden, bi, unroll=unroll, backend=backend, rngs=rngs))
            width = layers[-1].out_features
        self.layers = nnx.List(layers)
        self.pooling = pooling
        self.attention = AttentionPool(width, attention_dim, rngs=rngs) if pooling == "attention" else None
        self.embed_dropout = nnx.Dropout(embed_dropout)
        # Whole tokens: one draw per position, shared by all embedding dimensions.
        self.word_dropout = nnx.Dropout(word_dropout, broadcast_dims=(2,))
        self.dropout = nnx.Dropout(dropout)
        width *= 2 if pooling == "mean_max" else 1
        head = []
        for size in head_sizes:
            head.append(nnx.Linear(width, size, dtype=dtype, rngs=rngs, kernel_init=nnx.with_partitioning(
                nnx.initializers.lecun_normal(), ("features", "mlp"))))
            width = size
        self.head = nnx.List(head)
        self.out = nnx.Linear(width, num_outputs, dtype=dtype, rngs=rngs, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("features", "classes")))

    def encode(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """The last layer's (final state [B, D], outputs [B, T, D])."""
        # Batch-sharded from here on, whatever layout the embedding table has (e.g. FSDP rows).
        x = sharding.constrain(self.embed(ids).astype(self.dtype), ("batch", None, None))
        x = self.word_dropout(x, deterministic=deterministic, rngs=rngs)
        x = self.embed_dropout(x, deterministic=deterministic, rngs=rngs)
        final = None
        for i, layer in enumerate(self.layers):
            if i:
                x = self.dropout(x, deterministic=deterministic, rngs=rngs)
            final, x = layer(x, mask)
            x = sharding.constrain(x, ("batch", None, None))
        return final, x

    def features(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """The pooled text representation [B, D] fed to the head."""
        final, x = self.encode(ids, mask, deterministic=deterministic, rngs=rngs)
        if self.pooling == "last":
            return final
        if self.pooling == "attention":
            return self.attention(x, mask)
        if self.pooling == "mean_max":
            return jnp.concatenate([masked_pool(x, mask, "mean"), masked_pool(x, mask, "max")], axis=-1)
        return masked_pool(x, mask, self.pooling)

    def attention_weights(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, T] weights of attention pooling (sum 1 over real tokens, 0 on padding), for display."""
        if self.attention is None:
            raise ValueError(f"attention_weights needs model.pooling 'attention', not '{self.pooling}'")
        return self.attention.weights(self.encode(ids, mask)[1], mask)


    def from_data(self, data: TrainingData) -> None:
        """Starts the token table from pretrained vectors when the run has them."""
        start_embeddings(self.embed, data.embeddings)

    def __call__(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.features(ids, mask, deterministic=deterministic, rngs=rngs)
        for dense in self.head:
            x = self.dropout(x, deterministic=deterministic, rngs=rngs)
            x = jax.nn.relu(dense(x))
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        return self.out(x).astype(jnp.float32)
