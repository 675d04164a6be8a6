"""Config validation: every numeric field has a range, checked before any data is read, one line per mistake."""

import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from sentiment_jax import config_base, data, runs

REPO = pathlib.Path(__file__).resolve().parent.parent


def numeric_fields(node, prefix=""):
    """Dotted names of every leaf of a config that holds a number or a non-empty tuple of numbers."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from numeric_fields(value, f"{name}.")
            continue
        values = value if isinstance(value, (list, tuple)) else (value,)
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            yield name


def loose(cfg):
    """A copy that takes any value, as a hand-edited config.json could hold."""
    return ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)


def set_field(cfg, field, value):
    *path, leaf = field.split(".")
    node = cfg
    for key in path:
        node = node[key]
    node[leaf] = value


def outside(valid: config_base.Range):
    """Values just outside a range (or of the wrong kind), found without asking the range itself."""
    bad = [float("nan"), float("inf")]
    if valid.low is not None:
        bad.append(valid.low if valid.open_low else valid.low - (1 if valid.integer else 1e-3))
    if valid.high is not None:
        bad.append(valid.high if valid.open_high else valid.high + (1 if valid.integer else 1e-3))
    if valid.integer:
        bad.append(2.5)
    return bad


def test_every_numeric_field_has_a_range_and_the_defaults_are_in_it():
    cfg = config_base.base_config()
    fields = set(numeric_fields(cfg))
    assert len(fields) > 40  # the walk sees the config
    assert fields <= set(config_base.RANGES), f"no range for {sorted(fields - set(config_base.RANGES))}"
    for field in config_base.RANGES:  # no stale entry: each names a field
        config_base.get_field(cfg, field)
    config_base.check_config(cfg)


@pytest.mark.parametrize("field", sorted(config_base.RANGES))
def test_a_value_outside_its_range_is_a_one_line_error_naming_field_value_and_range(field):
    valid = config_base.RANGES[field]
    default = config_base.get_field(config_base.base_config(), field)
    for bad in outside(valid):
        cfg = loose(config_base.base_config())
        value = (*default[:-1], bad) if isinstance(default, tuple) and default else (bad,) if isinstance(
            default, tuple) else bad
        set_field(cfg, field, value)
        with pytest.raises(ValueError) as e:
            config_base.check_config(cfg)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{field} must be {valid}, got ")
        assert repr(value) in message


def test_range_wording_and_bounds_by_hand():
    assert str(config_base.RANGES["data.validation_fraction"]) == "in [0, 1)"
    assert str(config_base.RANGES["train.epochs"]) == "a positive integer"
    assert str(config_base.RANGES["train.learning_rate"]) == "> 0"
    assert str(config_base.RANGES["mesh.shape"]) == "an integer >= -1"
    fraction = config_base.RANGES["data.validation_fraction"]
    assert [fraction.admits(v) for v in (0, 0.0, 0.5, 0.999, 1.0, -0.2, True)] == [
        True, True, True, True, False, False, False]
    assert not config_base.RANGES["train.batch_size"].admits(16.0)


def test_a_saved_config_missing_later_fields_loads_with_their_defaults(tmp_path):
    """A run saved before a field existed reads it from base_config(), so no code needs a fallback."""
    cfg = config_base.base_config()
    cfg.data.name, cfg.data.language = "nusax_senti", "english"
    saved = cfg.to_dict()
    missing = ("train.ema_decay", "train.confidence_penalty", "data.max_test_examples", "model.bag_norm",
               "data.train_languages")
    for field in missing:
        *path, leaf = field.split(".")
        del config_base.get_field(saved, ".".join(path))[leaf]
    (tmp_path / runs.CONFIG_FILE).write_text(json.dumps(saved))
    loaded = runs.load_config(tmp_path)
    for field in missing:
        assert config_base.get_field(loaded, field) == config_base.get_field(config_base.base_config(), field)
    config_base.check_config(loaded)
    assert data.nusax_train_languages(loaded.data) == ("english",)


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.num_devices": 99}, "mesh.num_devices=99 but only 8 devices exist"),
    ({"mesh.shape": (3, 1, 1)}, "mesh.shape (3, 1, 1) needs 3 devices but 8 are available"),
    ({"train.batch_size": 12}, "train.batch_size=12 does not split over the 8 data-parallel devices"),
    ({"train.eval_batch_size": 21, "mesh.shape": (2, 1, -1)},
     "train.eval_batch_size=21 does not split over the 2 data-parallel devices"),
])
def test_mesh_is_checked_against_the_devices(overrides, message):
    cfg = config_base.base_config()
    for field, value in overrides.items():
        set_field(cfg, field, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_base.check_config(cfg)


def test_cli_range_error_is_one_line_before_any_data_is_read(tmp_path):
    """A missing data file would be reported if data were read first."""
    out = subprocess.run(
        [sys.executable, "-m", "sentiment_jax.main", f"--workdir={tmp_path / 'run'}", "--config=configs/lstm.py",
         "--config.data.name=csv", f"--config.data.train_file={tmp_path / 'absent.csv'}",
         "--config.data.validation_fraction=-0.2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: data.validation_fraction must be in [0, 1), got -0.2"]
    assert not (tmp_path / "run").exists()


TRANSFORMER = {"model.name": "transformer", "model.pooling": "mean", "data.max_length": 16}


@pytest.mark.parametrize("overrides,message", [
    ({"model.pooling": "median"}, "unknown model.pooling 'median' for model.name 'lstm'; choose one of ['last', "),
    ({**TRANSFORMER, "model.pooling": "last"}, "unknown model.pooling 'last' for model.name 'transformer'; choose one "
     "of ['mean', 'cls']"),
    ({"model.positions": "rotary"}, "unknown model.positions 'rotary'; choose one of ['sinusoidal', 'learned']"),
    ({**TRANSFORMER, "model.embed_dim": 10}, "model.embed_dim 10 must be even and divisible by model.num_heads 4; "),
    ({**TRANSFORMER, "model.head_sizes": (8,)}, "model.head_sizes (8,) is not used by the transformer"),
    ({**TRANSFORMER, "model.positions": "learned", "model.max_positions": 15},
     "model.max_positions 15 is too few for data.max_length 16; set it to at least 16"),
    ({**TRANSFORMER, "model.positions": "learned", "model.max_positions": 16, "model.pooling": "cls"},
     "model.max_positions 16 is too few for data.max_length 16 plus the CLS token; set it to at least 17"),
    ({"model.hidden_sizes": ()}, "model.hidden_sizes needs at least one layer size, got ()"),
    ({"model.hidden_sizes": (8, 8), "model.bidirectional": (True,)},
     "model.bidirectional must be True, False or one bool per layer of model.hidden_sizes (8, 8), got (True,)"),
    ({"model.name": "gru", "model.lstm_backend": "cudnn"},
     "model.lstm_backend 'cudnn' runs LSTM cells only, not model.name 'gru'; set --config.model.lstm_backend=scan"),
    ({"model.lstm_backend": "cuda"}, "unknown model.lstm_backend 'cuda'; choose one of ['scan', 'cudnn', 'cpu_kernel', "
                                     "'auto']"),
    ({"model.name": "rnn", "model.lstm_backend": "cpu_kernel"},
     "model.lstm_backend 'cpu_kernel' runs LSTM cells only, not model.name 'rnn'; set --config.model.lstm_backend=scan"),
    ({"model.bag_weights": "tfidf"}, "unknown model.bag_weights 'tfidf'; choose one of ['uniform', 'idf']"),
    ({"data.tokenizer.char_ngrams": (5, 3)}, "data.tokenizer.char_ngrams must be (shortest, longest), e.g. (3, 5), "
     "got (5, 3)"),
    ({"data.tokenizer.kind": "huggingface"}, "data.tokenizer.kind 'huggingface' needs a folder with tokenizer.json"),
    ({"backbone.pooling": "median"}, "unknown backbone.pooling 'median'; choose one of ['final', 'cls', 'mean', "
     "'layers_mean', 'label_words']"),
    ({"backbone.pooling": "label_words"}, "backbone.pooling 'label_words' needs backbone.label_words"),
    ({"backbone.label_words": ("bad", "good")}, "backbone.label_words are scored at a {mask} in backbone.template, "
     "which has none"),
    ({"data.inputs": "backbone_features", "data.bucket_width": 8},
     "data.bucket_width must be 0 for backbone features (they have a fixed width), got 8"),
])
def test_fields_that_do_not_go_together_are_one_line_errors_before_any_data_is_read(tmp_path, overrides, message):
    """Training data that does not exist would be reported if it were read first."""
    from sentiment_jax import train

    cfg = loose(config_base.base_config())
    cfg.data.name, cfg.data.train_file = "csv", str(tmp_path / "absent.csv")
    for field, value in overrides.items():
        set_field(cfg, field, value)
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(cfg, tmp_path / "run")
    assert not isinstance(e.value, data.DataError) and "\n" not in str(e.value)
    assert str(e.value).startswith(message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("pooling,max_positions", [("mean", 16), ("cls", 17)])
def test_learned_positions_that_cover_every_input_are_accepted(pooling, max_positions):
    cfg = config_base.base_config()
    for field, value in {**TRANSFORMER, "model.positions": "learned", "model.pooling": pooling,
                         "model.max_positions": max_positions}.items():
        set_field(cfg, field, value)
    config_base.check_config(cfg)
