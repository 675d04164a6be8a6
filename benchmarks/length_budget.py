"""What max_length and epochs do to configs/lstm.py's time on a CPU, from one measured training rate.

  SENTIMENT_JAX_DATA=../shared/data python benchmarks/length_budget.py --train_ex_s=74.9 [--lengths=200,256,300,400]

Tokenizes IMDB as the config does (cached in --workdir), then lays out the batches its pipeline makes
(length buckets of data.bucket_width) for each max_length. An LSTM's work per batch is proportional to
its width, so from the training rate measured at the config's own max_length (`--train_ex_s`, the
examples/s a run logs) it estimates training and eval seconds; eval runs forward only, at
`--eval_speedup` times the training rate per token (3: no backward pass). Start-up (reading, tokenizing,
compiling) is not included.
"""

import argparse
import pathlib

import numpy as np

from configs import lstm
from sentiment_jax import data, input_pipeline, runs, train


def mean_width(split: input_pipeline.Encoded, cfg, length: int, *, training: bool) -> float:
    """Mean batch width for `length`: pre-truncation keeps a text's last tokens, the last columns."""
    cut = input_pipeline.Encoded(split.ids[:, -length:], np.minimum(split.lengths, length), split.labels)
    batches = train.make_batches(cfg, cut, train=training)
    return float(np.mean([batches.batch(indices)["ids"].shape[1] for indices in batches.order(0)]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train_ex_s", type=float, required=True, help="measured training examples/s at the config's max_length")
    ap.add_argument("--lengths", default="200,256,300,400")
    ap.add_argument("--epochs", default="2,3")
    ap.add_argument("--eval_speedup", type=float, default=3.0)
    ap.add_argument("--workdir", default="runs/length_budget")
    args = ap.parse_args()
    cfg = lstm.get_config("imdb")
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = data.load_dataset(cfg.data)
    encoded = train.encode_splits(cfg, dataset, runs.create_encoder(cfg, dataset.splits["train"].texts), workdir)
    for name, split in encoded.items():
        n = split.lengths
        print(f"{name}: {len(n)} texts, tokens median {np.median(n):.0f}, mean {n.mean():.1f} (after the "
              f"{cfg.data.max_length}-token cut); longer than 200: {(n > 200).mean():.3f}")
    widths = {length: {name: mean_width(encoded[name], cfg, length, training=name == "train") for name in encoded}
              for length in map(int, args.lengths.split(","))}
    base = widths[cfg.data.max_length]["train"] if cfg.data.max_length in widths else mean_width(
        encoded["train"], cfg, cfg.data.max_length, training=True)
    tokens_per_s = args.train_ex_s * base
    print(f"\n{'max_length':>10s}  {'mean batch width, train / val / test':>36s}  {'epochs':>6s}  {'train s':>7s}  "
          f"{'eval s':>6s}  {'total min':>9s} (start-up not included)")
    for length, w in widths.items():
        for epochs in map(int, args.epochs.split(",")):
            train_s = len(encoded["train"].labels) * epochs * w["train"] / tokens_per_s
            eval_s = (len(encoded["validation"].labels) * epochs * w["validation"]
                      + len(encoded["test"].labels) * w["test"]) / (args.eval_speedup * tokens_per_s)
            print(f"{length:10d}  {w['train']:16.1f} / {w['validation']:6.1f} / {w['test']:6.1f}  {epochs:6d}  "
                  f"{train_s:7.0f}  {eval_s:6.0f}  {(train_s + eval_s) / 60:9.1f}")


if __name__ == "__main__":
    main()
