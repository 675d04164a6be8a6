"""Settings the sweep files share (they import this file as `presets`)."""

# The `quick` preset: small IMDB subsets that finish in minutes on a CPU.
QUICK = {
    "data.max_examples": 2000,
    "data.max_length": 200,
    "data.tokenizer.vocab_size": 10000,
    "train.epochs": 2,
}
