"""Shared test setup: 8 simulated CPU devices, and the real data when it is present."""

import os
import pathlib

import jax
import pytest

# Tests that compare 1 device against 8 need the 8 to exist before JAX starts.
jax.config.update("jax_num_cpu_devices", 8)

REPO = pathlib.Path(__file__).resolve().parent.parent


def data_root() -> pathlib.Path | None:
    """$SENTIMENT_JAX_DATA, else ../shared/data beside the checkout, else None."""
    for candidate in (os.environ.get("SENTIMENT_JAX_DATA"), REPO.parent / "shared" / "data"):
        if candidate and pathlib.Path(candidate).is_dir():
            return pathlib.Path(candidate)
    return None


@pytest.fixture
def real_data() -> pathlib.Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not found; set SENTIMENT_JAX_DATA")
    return root
