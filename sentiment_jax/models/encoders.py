"""Pretrained Transformer encoders in Flax NNX, loaded from Hugging Face checkpoint folders.

transformers 5.x ships no Flax models, so the two architectures we need are written here
and read `config.json` + `model.safetensors` with NumPy (no torch at runtime):

* `BertEncoder`: BERT, MiniLM, bge-style models. Learned absolute positions, token types,
  LayerNorm after each residual block.
* `ModernBertEncoder`: rotary positions, GeGLU MLP, LayerNorm before each block, no biases,
  sliding-window ("local") attention in all but every n-th layer.

Both are called as `encoder(ids, mask)` with ids/mask [B, T] (padding after the text) and
return every hidden state stacked, [num_layers + 1, B, T, H], so poolings can pick layers.
Parameter names mirror the checkpoint's (see `HF_NAMES`) and carry logical axis names
("vocab", "embed", "heads", "mlp", ...) mapped to mesh axes by `config.mesh.logical_axis_rules`.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sentiment_jax._extras import require

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class BackboneError(ValueError):
    """A backbone folder that cannot be used, phrased as one line naming the fix."""


def _dense(rngs, din, dout, axes, bias=True, dtype=None):
    init = nnx.initializers.normal(0.02)
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, rngs=rngs,
                      kernel_init=nnx.with_partitioning(init, axes),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[1:]))


def _norm(rngs, dim, eps, bias=True, dtype=None):
    return nnx.LayerNorm(dim, epsilon=eps, use_bias=bias, dtype=dtype, rngs=rngs,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)))


def _embed(rngs, n, dim, axes, dtype=None):
    return nnx.Embed(n, dim, dtype=dtype, rngs=rngs,
                     embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes))


def _attention(q, k, v, mask):
    """q, k, v [B, T, N, D]; mask [B, 1, T, T] (True = may attend). Softmax in float32.

    Heads are moved in front of time first, so both products are plain batched matmuls: on
    CPU the einsum form made XLA fuse the softmax into a transposing matmul that ran 1.8x slower.
    """
    q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))
    scores = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return (weights @ v).swapaxes(1, 2)


# ---------------------------------------------------------------------------------------
# BERT family.


class BertLayer(nnx.Module):
    def __init__(self, c: dict, dtype, rngs: nnx.Rngs):
        h, m, eps = c["hidden_size"], c["intermediate_size"], c["layer_norm_eps"]
        self.heads = c["num_attention_heads"]
        self.act = ACTIVATIONS[c["hidden_act"]]
        self.query = _dense(rngs, h, h, ("embed", "heads"), dtype=dtype)
        self.key = _dense(rngs, h, h, ("embed", "heads"), dtype=dtype)
        self.value = _dense(rngs, h, h, ("embed", "heads"), dtype=dtype)
        self.attn_out = _dense(rngs, h, h, ("heads", "embed"), dtype=dtype)
        self.attn_norm = _norm(rngs, h, eps, dtype=dtype)
        self.mlp_in = _dense(rngs, h, m, ("embed", "mlp"), dtype=dtype)
        self.mlp_out = _dense(rngs, m, h, ("mlp", "embed"), dtype=dtype)
        self.mlp_norm = _norm(rngs, h, eps, dtype=dtype)

    def __call__(self, x, mask):
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
        a = _attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), mask)
        x = self.attn_norm(x + self.attn_out(a.reshape(x.shape)))
        return self.mlp_norm(x + self.mlp_out(self.act(self.mlp_in(x))))


class BertEncoder(nnx.Module):
    ARCHITECTURE = "bert"
    LAYER_PREFIX = "encoder.layer"
    HF_NAMES = {
        "word_embeddings": "embeddings.word_embeddings",
        "position_embeddings": "embeddings.position_embeddings",
        "token_type_embeddings": "embeddings.token_type_embeddings",
        "embed_norm": "embeddings.LayerNorm",
        "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
        "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
        "mlp_in": "intermediate.dense", "mlp_out": "output.dense", "mlp_norm": "output.LayerNorm",
    }

    def __init__(self, c: dict, *, dtype=None, rngs: nnx.Rngs):
        h = c["hidden_size"]
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise BackboneError(f"BERT position_embedding_type '{c['position_embedding_type']}' is not "
                                "supported; only 'absolute'")
        self.word_embeddings = _embed(rngs, c["vocab_size"], h, ("vocab", "embed"), dtype)
        self.position_embeddings = _embed(rngs, c["max_position_embeddings"], h, ("pos", "embed"), dtype)
        self.token_type_embeddings = _embed(rngs, c["type_vocab_size"], h, (None, "embed"), dtype)
        self.embed_norm = _norm(rngs, h, c["layer_norm_eps"], dtype=dtype)
        self.layers = nnx.List([BertLayer(c, dtype, rngs) for _ in range(c["num_hidden_layers"])])
        self.mlm_head: MlmHead | None = nnx.data(None)  # set by load_encoder if the checkpoint has one

    def input_embedding(self) -> jax.Array:
        return self.word_embeddings.embedding[...]

    def __call__(self, ids, mask):
        positions = jnp.arange(ids.shape[1])[None, :]
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings(
            jnp.zeros_like(ids))
        x = self.embed_norm(x)
        attend = mask[:, None, None, :].astype(bool)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, attend)
            hidden.append(x)
        return jnp.stack(hidden)


# ---------------------------------------------------------------------------------------
# ModernBERT.


def _rotate(x, positions, theta):
    """Rotary embedding of x [B, T, N, D] (halves layout, as in the reference implementation)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions[:, None].astype(jnp.float32) * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[None, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return (x * cos + jnp.concatenate([-x2, x1], -1) * sin).astype(x.dtype)


class ModernBertLayer(nnx.Module):
    def __init__(self, c: dict, index: int, dtype, rngs: nnx.Rngs):
        h, m, eps, nb = c["hidden_size"], c["intermediate_size"], c["norm_eps"], c["norm_bias"]
        self.heads = c["num_attention_heads"]
        self.act = ACTIVATIONS[c["hidden_activation"]]
        self.local = c["layer_types"][index] == "sliding_attention"
        self.theta = c["rope_theta"]["sliding_attention" if self.local else "full_attention"]
        self.window = c["local_attention"] // 2  # tokens each side
        # The first layer has no pre-attention norm: the embeddings were just normalised.
        self.attn_norm = _norm(rngs, h, eps, nb, dtype) if index else None
        self.qkv = _dense(rngs, h, 3 * h, ("embed", "heads"), c["attention_bias"], dtype)
        self.attn_out = _dense(rngs, h, h, ("heads", "embed"), c["attention_bias"], dtype)
        self.mlp_norm = _norm(rngs, h, eps, nb, dtype)
        self.mlp_in = _dense(rngs, h, 2 * m, ("embed", "mlp"), c["mlp_bias"], dtype)
        self.mlp_out = _dense(rngs, m, h, ("mlp", "embed"), c["mlp_bias"], dtype)

    def __call__(self, x, mask):
        b, t, _ = x.shape
        y = self.attn_norm(x) if self.attn_norm is not None else x
        q, k, v = jnp.split(self.qkv(y).reshape(b, t, 3, self.heads, -1), 3, axis=2)
        positions = jnp.arange(t)
        q, k, v = _rotate(q[:, :, 0], positions, self.theta), _rotate(k[:, :, 0], positions, self.theta), v[:, :, 0]
        if self.local:
            mask = mask & (jnp.abs(positions[:, None] - positions[None, :]) <= self.window)
        x = x + self.attn_out(_attention(q, k, v, mask).reshape(x.shape))
        inputs, gate = jnp.split(self.mlp_in(self.mlp_norm(x)), 2, axis=-1)
        return x + self.mlp_out(self.act(inputs) * gate)


class ModernBertEncoder(nnx.Module):
    ARCHITECTURE = "modernbert"
    LAYER_PREFIX = "layers"
    HF_NAMES = {
        "tok_embeddings": "embeddings.tok_embeddings", "embed_norm": "embeddings.norm",
        "attn_norm": "attn_norm", "qkv": "attn.Wqkv", "attn_out": "attn.Wo",
        "mlp_norm": "mlp_norm", "mlp_in": "mlp.Wi", "mlp_out": "mlp.Wo", "final_norm": "final_norm",
    }

    def __init__(self, c: dict, *, dtype=None, rngs: nnx.Rngs):
        c = _modernbert_defaults(c)
        h, eps, nb = c["hidden_size"], c["norm_eps"], c["norm_bias"]
        self.tok_embeddings = _embed(rngs, c["vocab_size"], h, ("vocab", "embed"), dtype)
        self.embed_norm = _norm(rngs, h, eps, nb, dtype)
        self.layers = nnx.List([ModernBertLayer(c, i, dtype, rngs) for i in range(c["num_hidden_layers"])])
        self.final_norm = _norm(rngs, h, eps, nb, dtype)
        self.mlm_head: MlmHead | None = nnx.data(None)  # set by load_encoder if the checkpoint has one

    def input_embedding(self) -> jax.Array:
        return self.tok_embeddings.embedding[...]

    def __call__(self, ids, mask):
        """Hidden states: the embeddings, each layer's output, and the last one final-normed."""
        x = self.embed_norm(self.tok_embeddings(ids))
        attend = mask[:, None, None, :].astype(bool)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, attend)
            hidden.append(x)
        hidden[-1] = self.final_norm(x)
        return jnp.stack(hidden)


def _modernbert_defaults(c: dict) -> dict:
    """Fills the fields older or newer config.json files spell differently (per transformers 5)."""
    c = dict(c)
    for key, value in (("intermediate_size", 1152), ("hidden_activation", "gelu"), ("norm_eps", 1e-5),
                       ("norm_bias", False), ("attention_bias", False), ("mlp_bias", False),
                       ("local_attention", 128)):
        c.setdefault(key, value)
    every = c.get("global_attn_every_n_layers", 3)
    c["layer_types"] = c.get("layer_types") or [
        "sliding_attention" if i % every else "full_attention" for i in range(c["num_hidden_layers"])]
    rope = c.get("rope_parameters") or {}
    c["rope_theta"] = {
        "full_attention": (rope.get("full_attention") or {}).get("rope_theta", c.get("global_rope_theta", 160000.0)),
        "sliding_attention": (rope.get("sliding_attention") or {}).get("rope_theta",
                                                                       c.get("local_rope_theta", 10000.0)),
    }
    return c


# ---------------------------------------------------------------------------------------
# Masked-LM head (for the label-word verbalizer), when the checkpoint has one.


class MlmHead(nnx.Module):
    """dense -> activation -> LayerNorm -> logits against the (tied) input embeddings + a bias."""

    def __init__(self, hidden: int, vocab: int, act: str, eps: float, dense_bias: bool, norm_bias: bool,
                 dtype, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[act]
        self.dense = _dense(rngs, hidden, hidden, ("embed", "mlp"), dense_bias, dtype)
        self.norm = _norm(rngs, hidden, eps, norm_bias, dtype)
        self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("vocab",))(rngs.params(), (vocab,)))

    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        """Vocabulary logits [..., V] of hidden states x [..., H]; embedding [V, H]."""
        x = self.norm(self.act(self.dense(x)))
        return (x @ embedding.T.astype(x.dtype)).astype(jnp.float32) + self.bias[...]


# Checkpoint names of (dense, norm, output bias) in BertForMaskedLM / ModernBertForMaskedLM.
MLM_NAMES = {"bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                      "cls.predictions.bias"),
             "modernbert": ("head.dense", "head.norm", "decoder.bias")}


def load_mlm_head(config: dict, weights: dict[str, np.ndarray], dtype=None) -> MlmHead | None:
    """The checkpoint's masked-LM head, or None if it has none (e.g. sentence encoders like MiniLM)."""
    kind = config["model_type"]
    dense, norm, bias = MLM_NAMES[kind]
    if dense + ".weight" not in weights:
        return None
    if kind == "bert":
        act, eps, norm_bias = config["hidden_act"], config["layer_norm_eps"], True
    else:
        c = _modernbert_defaults(config)
        act, eps, norm_bias = c.get("classifier_activation", "gelu"), c["norm_eps"], c["norm_bias"]
    head = MlmHead(config["hidden_size"], config["vocab_size"], act, eps, dense + ".bias" in weights, norm_bias,
                   dtype, nnx.Rngs(0))
    head.dense.kernel[...] = jnp.asarray(weights[dense + ".weight"].T)
    if head.dense.bias is not None:
        head.dense.bias[...] = jnp.asarray(weights[dense + ".bias"])
    head.norm.scale[...] = jnp.asarray(weights[norm + ".weight"])
    if head.norm.bias is not None:
        head.norm.bias[...] = jnp.asarray(weights[norm + ".bias"])
    if bias in weights:
        head.bias[...] = jnp.asarray(weights[bias])
    return head


# ---------------------------------------------------------------------------------------
# Loading a checkpoint folder.

ENCODERS = {"bert": BertEncoder, "modernbert": ModernBertEncoder}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def read_config(folder: pathlib.Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise BackboneError(f"{folder}: no config.json; point backbone.path at a Hugging Face model folder")
    config = json.loads(file.read_text())
    if config.get("model_type") not in ENCODERS:
        raise BackboneError(f"{file}: model_type '{config.get('model_type')}' is not supported; "
                            f"choose a {' or '.join(sorted(ENCODERS))} checkpoint")
    return config


def _hf_key(cls, path: tuple) -> str:
    """Our parameter path, e.g. ('layers', 0, 'query', 'kernel'), -> the checkpoint's name."""
    *modules, leaf = path
    prefix = ""
    if modules[0] == "layers":
        prefix, modules = f"{cls.LAYER_PREFIX}.{modules[1]}.", modules[2:]
    return f"{prefix}{cls.HF_NAMES[modules[0]]}.{_LEAF[leaf]}"


def load_weights(model: nnx.Module, weights: dict[str, np.ndarray]) -> None:
    """Copies checkpoint arrays into `model` in place (Linear kernels are stored transposed)."""
    cls = type(model)
    # Checkpoints saved from a task model (BertForMaskedLM, ModernBertForMaskedLM) prefix the encoder.
    prefix = next((p for p in ("", "bert.", "model.") if any(k.startswith(p + "embeddings.") for k in weights)), "")
    state = nnx.state(model, nnx.Param)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        key = prefix + _hf_key(cls, path)
        if key not in weights:
            raise BackboneError(f"model.safetensors has no '{key}'; is this a {cls.ARCHITECTURE} checkpoint?")
        value = weights[key].T if path[-1] == "kernel" else weights[key]
        if value.shape != var.shape:
            raise BackboneError(f"model.safetensors '{key}' has shape {value.shape}, config.json implies {var.shape}")
        flat[path] = jnp.asarray(value, var.dtype)
    nnx.update(model, nnx.from_flat_state(flat))


def load_encoder(folder: str | pathlib.Path, *, dtype=None) -> tuple[nnx.Module, dict]:
    """(encoder with the folder's weights, its config.json) for a local checkpoint folder.

    `encoder.mlm_head` is the masked-LM head if the checkpoint has one, else None.
    """
    load_file = require("safetensors.numpy", "hf").load_file
    folder = pathlib.Path(folder)
    config = read_config(folder)
    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        raise BackboneError(f"{folder}: no model.safetensors (pytorch_model.bin is not read); "
                            "save the checkpoint with safetensors")
    model = ENCODERS[config["model_type"]](config, dtype=dtype, rngs=nnx.Rngs(0))
    weights = load_file(str(weights_file))
    load_weights(model, weights)
    model.mlm_head = load_mlm_head(config, weights, dtype)
    return model, config
