"""Which words a trained model used for one text: saliency for any model, attention where it has one.

- Gradient x input, for every model with an `embed`: d log p(predicted class) / d e_t,
  dotted with the word's embedding e_t. Positive words pushed towards the prediction,
  negative ones against it. The gradient is taken with respect to a zero perturbation
  added to the embedding output, so repeated words get one score each.
- Occlusion, for models on frozen-backbone features (no embedding to differentiate): per
  word, log p(predicted class) of the text minus that of the text without the word.
- Attention pooling weights (BiLSTM with `pooling=attention`): how much each word's
  state counts in the text vector.
- Transformer attention: the per-layer, per-head maps, and their rollout (heads averaged,
  the residual added as 0.5 * identity, layers multiplied) read from the text's summary
  position (the CLS token, or the mean over words).

  python -m sentiment_jax.interpret --workdir=runs/lstm --text="A dull plot, but the acting is superb."
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from sentiment_jax import losses, runs


def tokens(run: runs.Run, text: str) -> tuple[list[str], np.ndarray]:
    """The words (or subword pieces) the model sees and their ids, truncated like the training data."""
    tok, data = run.encoder, run.cfg.data
    if hasattr(tok, "pieces"):  # n-gram features: words, character and word n-grams
        words = [piece for piece, _ in tok.pieces(text)]
    elif hasattr(tok, "split"):  # word tokenizer
        words = tok.split(text)
    else:  # Hugging Face tokenizer
        words = tok.tokenizer.encode(text, add_special_tokens=True).tokens
    ids = tok.encode([text])[0]
    keep = slice(-data.max_length, None) if data.truncation == "pre" else slice(0, data.max_length)
    words, ids = words[keep], ids[keep]
    if len(ids) == 0:
        raise ValueError("the text has no tokens the model knows; give a longer text")
    return list(words), ids


class _Shifted:
    """Stands in for the embedding: the same lookup plus `delta`, so we can differentiate at delta = 0."""

    def __init__(self, embed, delta):
        self.embed, self.delta = embed, delta

    def __call__(self, ids):
        return self.embed(ids) + self.delta


def saliency(model: nnx.Module, ids: jax.Array, mask: jax.Array, target: int) -> np.ndarray:
    """Gradient x input per token [T] for log p(target)."""
    if not hasattr(model, "embed"):
        raise ValueError(f"{type(model).__name__} has no `embed`; saliency needs the word embedding")
    graphdef, state = nnx.split(model)
    embedded = model.embed(ids)

    def log_prob(delta):
        m = nnx.merge(graphdef, state)
        m.embed = _Shifted(m.embed, delta)
        return jnp.log(losses.probabilities(m(ids, mask, deterministic=True))[0, target])

    grad = jax.jit(jax.grad(log_prob))(jnp.zeros_like(embedded))
    return np.asarray(jnp.sum(grad * embedded, axis=-1)[0])


def rollout(maps: list[np.ndarray]) -> np.ndarray:
    """Attention rollout over layers: each [heads, T, T] -> one [T, T] of how much query i draws on key j."""
    out = None
    for layer in maps:
        a = layer.mean(0)
        a = 0.5 * a + 0.5 * np.eye(len(a))  # the residual connection
        a = a / a.sum(-1, keepdims=True)
        out = a if out is None else a @ out
    return out


def occlusion(run: runs.Run, text: str) -> dict:
    """Prediction and, per whitespace word, how much removing it lowers log p(predicted class)."""
    words = text.split()
    if not words:
        raise ValueError("the text has no words; give a longer text")
    probs = run.predict([text] + [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))])
    predicted = int(probs[0].argmax())
    logp = np.log(np.maximum(probs[:, predicted], np.finfo(np.float32).tiny))
    return {"words": words, "probabilities": probs[0], "predicted": predicted,
            "label": run.label_names[predicted], "saliency": logp[0] - logp[1:]}


def explain(run: runs.Run, text: str) -> dict:
    """Prediction, saliency and whatever attention the model has, for one text."""
    model = run.model
    if not hasattr(model, "embed"):
        return occlusion(run, text)
    words, token_ids = tokens(run, text)
    ids = jnp.asarray(token_ids[None, :])
    mask = jnp.ones_like(ids, bool)
    probs = np.asarray(nnx.jit(lambda m: losses.probabilities(m(ids, mask, deterministic=True)))(model)[0])
    predicted = int(probs.argmax())
    out = {"words": words, "probabilities": probs, "predicted": predicted,
           "label": run.label_names[predicted], "saliency": saliency(model, ids, mask, predicted)}
    weights = None
    if hasattr(model, "attention_weights"):
        try:
            weights = nnx.jit(lambda m: m.attention_weights(ids, mask))(model)
        except ValueError:  # e.g. an LSTM whose pooling is not attention
            weights = None
    if isinstance(weights, (list, tuple)):  # transformer: per layer [1, heads, T', T']
        maps = [np.asarray(w[0], np.float64) for w in weights]
        extra = maps[0].shape[-1] - len(words)  # a CLS token in front, if the model has one
        rolled = rollout(maps)
        summary = rolled[0] if extra else rolled.mean(0)
        out["attention_maps"] = [m[:, extra:, extra:] for m in maps]
        out["attention_rollout"] = summary[extra:]
    elif weights is not None:  # attention pooling: [1, T]
        out["attention_pooling"] = np.asarray(weights[0], np.float64)
    return out


def top_words(words: list[str], scores: np.ndarray, k: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [(words[i], float(scores[i])) for i in order]


# ---------------------------------------------------------------------------------------
# Figures.


def _word_grid(ax, words, scores, title, cmap, signed, per_row=12):
    """Words in reading order on a grid, each cell coloured by its score."""
    import matplotlib.pyplot as plt

    rows = -(-len(words) // per_row)
    grid = np.full((rows, per_row), np.nan)
    grid.flat[:len(words)] = scores
    limit = float(np.abs(scores).max()) or 1.0
    image = ax.imshow(grid, cmap=cmap, vmin=-limit if signed else 0, vmax=limit, aspect="auto")
    for i, word in enumerate(words):
        r, c = divmod(i, per_row)
        value = (scores[i] + limit) / (2 * limit) if signed else scores[i] / limit
        dark = value > 0.8 or (signed and value < 0.2)
        ax.text(c, r, word[:14], ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10, loc="left")
    plt.colorbar(image, ax=ax, fraction=0.03, pad=0.01)


def figure(explanation: dict, out: str | pathlib.Path) -> pathlib.Path:
    """One word heatmap per method in one PNG."""
    from sentiment_jax import plots  # first: it picks the file-only backend
    import matplotlib.pyplot as plt

    words = explanation["words"]
    panels = [("saliency", f"gradient x input towards '{explanation['label']}' "
                           f"(p = {explanation['probabilities'][explanation['predicted']]:.3f}); "
                           "red for, blue against", "RdBu_r", True)]
    if "attention_pooling" in explanation:
        panels.append(("attention_pooling", "attention pooling weights", "Oranges", False))
    if "attention_rollout" in explanation:
        panels.append(("attention_rollout", "attention rollout over layers", "Oranges", False))
    rows = -(-len(words) // 12)
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, (0.45 * rows + 0.7) * len(panels)), squeeze=False)
    for ax, (key, title, cmap, signed) in zip(axes[:, 0], panels):
        _word_grid(ax, words, np.asarray(explanation[key]), title, cmap, signed)
    fig.tight_layout()
    return plots.save_figure(fig, out)


def attention_figure(explanation: dict, out: str | pathlib.Path, max_words: int = 40) -> pathlib.Path:
    """Transformer maps, one panel per layer and head (rows: queries, columns: keys)."""
    from sentiment_jax import plots  # first: it picks the file-only backend
    import matplotlib.pyplot as plt

    maps, words = explanation["attention_maps"], explanation["words"][:max_words]
    n = len(words)
    layers, heads = len(maps), maps[0].shape[0]
    size = 2.2 + 0.12 * n
    fig, axes = plt.subplots(layers, heads, figsize=(size * heads, size * layers), squeeze=False)
    for l, layer in enumerate(maps):
        for h in range(heads):
            ax = axes[l, h]
            ax.imshow(layer[h, :n, :n], cmap="viridis", vmin=0)
            ax.set_title(f"layer {l + 1} head {h + 1}", fontsize=9)
            ticks = range(n) if n <= 25 else []
            ax.set_xticks(ticks, [words[i] for i in ticks], rotation=90, fontsize=6)
            ax.set_yticks(ticks, [words[i] for i in ticks], fontsize=6)
    fig.suptitle("attention weights: rows are queries, columns the words they attend to", fontsize=10)
    fig.tight_layout()
    return plots.save_figure(fig, out)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so the modules can be imported together."""
    flags.DEFINE_string("workdir", None, "A trained run.", required=True)
    flags.DEFINE_string("text", None, "The text to explain.", required=True)
    flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
    flags.DEFINE_integer("top", 8, "How many top words to print per method.")
    flags.DEFINE_string("out", None, "PNG to write (default WORKDIR/interpret.png).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        explanation = explain(runs.load(FLAGS.workdir, FLAGS.checkpoint), FLAGS.text)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    probs = ", ".join(f"{p:.3f}" for p in explanation["probabilities"])
    print(f"prediction: {explanation['label']} (probabilities {probs})")
    for key in ("saliency", "attention_pooling", "attention_rollout"):
        if key in explanation:
            words = top_words(explanation["words"], np.asarray(explanation[key]), FLAGS.top)
            print(f"top words by {key.replace('_', ' ')}: " + ", ".join(f"{w} ({s:+.3f})" for w, s in words))
    against = top_words(explanation["words"], -np.asarray(explanation["saliency"]), FLAGS.top)
    print("top words against the prediction: " + ", ".join(f"{w} ({-s:+.3f})" for w, s in against if s > 0))
    out = pathlib.Path(FLAGS.out or pathlib.Path(FLAGS.workdir) / "interpret.png")
    written = [figure(explanation, out)]
    if "attention_maps" in explanation:
        written.append(attention_figure(explanation, out.with_name(out.stem + "_attention_maps.png")))
    print("figures: " + ", ".join(str(w) for w in written))


if __name__ == "__main__":
    define_flags()
    app.run(main)
