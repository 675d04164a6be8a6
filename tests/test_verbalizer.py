"""Verbalizer invariants on a tiny random BERT saved to a folder: templates, padding, cache, frozen backbone."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save_file

from sentiment_jax import data, losses, sharding, train, verbalizer
from sentiment_jax.config_base import base_config
from sentiment_jax.models import encoders, heads

WORDS = "the sentiment of this statement is a movie film good great bad awful plot was it and not very".split()
TEMPLATE = " the sentiment of this statement is"


def _tiny_bert(folder: pathlib.Path) -> pathlib.Path:
    """config.json, model.safetensors (random, checkpoint names) and a word-level tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"model_type": "bert", "vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
              "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    (folder / "config.json").write_text(json.dumps(config))
    model = encoders.BertEncoder(config, rngs=nnx.Rngs(0))
    weights = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var[...])
        weights[encoders._hf_key(encoders.BertEncoder, path)] = value.T.copy() if path[-1] == "kernel" else value
    rng = np.random.default_rng(0)  # a random masked-LM head, as BertForMaskedLM stores it
    for name, shape in (("transform.dense.weight", (16, 16)), ("transform.dense.bias", (16,)),
                        ("transform.LayerNorm.weight", (16,)), ("transform.LayerNorm.bias", (16,)),
                        ("bias", (len(vocab),))):
        weights["cls.predictions." + name] = rng.normal(size=shape).astype(np.float32)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _cfg(folder, tmp_path) -> ml_collections.ConfigDict:
    c = base_config()
    c.backbone.path = str(folder)
    c.backbone.template = TEMPLATE
    c.backbone.batch_size = 8  # 8 simulated devices
    c.backbone.bucket_width = 8
    c.backbone.layers = (0, -1)
    c.backbone.cache_dir = str(tmp_path / "features")
    c.data.max_length = 16
    return c


def test_template_survives_truncation_and_windows_cover_the_text(folder, tmp_path):
    cfg = _cfg(folder, tmp_path)
    backbone = verbalizer.load_backbone(cfg.backbone)
    template = backbone.tokenizer.tokenizer.encode(TEMPLATE, add_special_tokens=False).ids
    text_ids = lambda t: backbone.tokenizer.tokenizer.encode(t, add_special_tokens=False).ids
    long = " ".join(["good movie"] * 5 + ["bad plot"] * 5)  # 20 words; room for 16 - 2 - 6 = 8
    rows, owner = verbalizer.encode_windows(backbone.tokenizer, [long, "great film"], TEMPLATE, 16)
    assert [len(r) for r in rows] == [16, 2 + 2 + len(template)]
    assert list(owner) == [0, 1]
    assert rows[0][0] == 2 and rows[0][-1] == 3 and list(rows[0][-1 - len(template):-1]) == template
    assert list(rows[0][1:9]) == text_ids(long)[-8:]  # 'pre' truncation keeps the end
    one_window = rows[0]
    rows, owner = verbalizer.encode_windows(backbone.tokenizer, [long], TEMPLATE, 16, windows=4)
    assert list(owner) == [0, 0, 0]  # 20 tokens in windows of 8 cut from the end: 8 + 8 + 4
    assert sum((list(r[1:-1 - len(template)]) for r in rows[::-1]), []) == text_ids(long)
    assert all(list(r[-1 - len(template):-1]) == template for r in rows)
    assert list(rows[0]) == list(one_window)  # the first window is the one-window row
    rows, _ = verbalizer.encode_windows(backbone.tokenizer, [long], TEMPLATE, 16, windows=2, truncation="post")
    assert [list(r[1:9]) for r in rows] == [text_ids(long)[:8], text_ids(long)[8:16]]  # 'post' keeps the start


def test_windows_reuse_the_one_window_cache_and_encode_only_the_extra_windows(folder, tmp_path):
    cfg = _cfg(folder, tmp_path)
    cfg.backbone.windows = 3
    backbone = verbalizer.load_backbone(cfg.backbone)
    extract = verbalizer.Extractor(backbone, cfg.backbone.layers, sharding.make_mesh(cfg.mesh), cfg.mesh)
    texts = [" ".join(["good movie"] * 5 + ["bad plot"] * 5), "great film", "awful plot " * 5]
    encoded = []
    def counting(rows, *args, **kwargs):
        encoded.append(len(rows))
        return extract(rows, *args, **kwargs)
    single = verbalizer.split_features(cfg, backbone, lambda: counting, texts, None, windows=1)
    assert encoded == [3]
    windowed = verbalizer.split_features(cfg, backbone, lambda: counting, texts, None)
    rows, owner = verbalizer.encode_windows(backbone.tokenizer, texts, TEMPLATE, 16, windows=3)
    assert encoded == [3, len(rows) - 3]  # only the extra windows were encoded
    expected = verbalizer.average_windows(extract(rows, 8, 8), owner, 3, [len(r) for r in rows])
    for name in verbalizer.POOLINGS:
        np.testing.assert_allclose(windowed[name], expected[name], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(windowed["mean"][1], single["mean"][1])  # a short text has one window
    assert not list((tmp_path / "features").glob("*.partial.npz"))  # progress files go once the cache is saved


def test_a_stopped_extraction_resumes_from_its_progress_file(folder, tmp_path, monkeypatch):
    cfg = _cfg(folder, tmp_path)
    backbone = verbalizer.load_backbone(cfg.backbone)
    extract = verbalizer.Extractor(backbone, cfg.backbone.layers, sharding.make_mesh(cfg.mesh), cfg.mesh)
    texts = [" ".join(["good movie"] * k) for k in range(1, 21)]
    rows, _ = verbalizer.encode_windows(backbone.tokenizer, texts, TEMPLATE, 16)
    monkeypatch.setattr(verbalizer, "PROGRESS_SECONDS", 0)  # save after every batch
    progress = tmp_path / "progress.npz"
    full = extract(rows, 8, 8, progress=progress)
    with np.load(progress) as f:
        assert int(f["done"]) == len(rows) and int(f["num_rows"]) == len(rows)
    # Pretend a run stopped after the 8 shortest rows (texts 0-7), whose saved features are marked.
    stopped = {name: np.where(np.arange(len(rows))[:, None] < 8, 7.0, 0.0 * v).astype(np.float32)
               for name, v in full.items()}
    verbalizer._save(progress, **stopped, done=8, num_rows=len(rows))
    resumed = extract(rows, 8, 8, progress=progress)
    for name in verbalizer.POOLINGS:
        np.testing.assert_array_equal(resumed[name][:8], 7.0)  # taken from the file, not recomputed
        np.testing.assert_allclose(resumed[name][8:], full[name][8:], atol=1e-6)
    verbalizer._save(progress, **stopped, done=8, num_rows=3)  # a file for other rows is ignored
    np.testing.assert_allclose(extract(rows, 8, 8, progress=progress)["mean"], full["mean"], atol=1e-6)


def test_padding_never_changes_features_and_poolings_pick_the_right_tokens(folder, tmp_path):
    cfg = _cfg(folder, tmp_path)
    backbone = verbalizer.load_backbone(cfg.backbone)
    words = ("bad", "good")
    extract = verbalizer.Extractor(backbone, cfg.backbone.layers, sharding.make_mesh(cfg.mesh), cfg.mesh, words)
    texts = ["good film", "it was not very good and the plot was bad bad bad", "awful"]
    rows, _ = verbalizer.encode_windows(backbone.tokenizer, texts, TEMPLATE + " {mask}", 32)
    assert all(list(r).count(4) == 1 for r in rows)  # {mask} became the [MASK] token
    together = extract(rows, 8, 8)  # one batch, padded to the longest row
    for i, row in enumerate(rows):
        alone = extract([row], 8, 8)  # its own batch, padded to its own bucket
        for name in verbalizer.POOLINGS + ("label_words",):
            np.testing.assert_allclose(together[name][i], alone[name][0], atol=1e-5, err_msg=name)
    enc, row = backbone.encoder, rows[0]
    hidden = enc(jnp.asarray(row)[None], jnp.ones((1, len(row)), jnp.int32))[:, 0]
    np.testing.assert_allclose(together["final"][0], hidden[-1, -1], atol=1e-5)
    np.testing.assert_allclose(together["cls"][0], hidden[-1, 0], atol=1e-5)
    np.testing.assert_allclose(together["layers_mean"][0], hidden[jnp.asarray([0, -1])].mean((0, 1)), atol=1e-5)
    logp = jax.nn.log_softmax(enc.mlm_head(hidden[-1, list(row).index(4)], enc.input_embedding()))
    np.testing.assert_allclose(together["label_words"][0], logp[np.asarray([WORDS.index(w) + 5 for w in words])],
                               atol=1e-5)
    with pytest.raises(ValueError, match="single-token"):
        verbalizer.label_word_ids(backbone.tokenizer, ["good film"])


def test_windows_average_their_features_weighted_by_length():
    feats = {"mean": np.arange(8, dtype=np.float32).reshape(4, 2)}
    out = verbalizer.average_windows(feats, np.asarray([0, 0, 1, 2]), 3, np.asarray([3, 1, 5, 7]))
    np.testing.assert_allclose(out["mean"], [[0.5, 1.5], [4, 5], [6, 7]])


def test_batchnorm_statistics_ignore_padding_rows():
    def stats(x, mask):
        model = heads.FeatureMLP(4, (3,), 1, dropout=0.0, rngs=nnx.Rngs(0))
        model(x, mask, deterministic=False)
        return np.asarray(model.norms[0].mean[...])
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    padded = np.concatenate([x, np.zeros((2, 4), np.float32)])
    mask = np.concatenate([np.ones((6, 4), bool), np.zeros((2, 4), bool)])
    np.testing.assert_allclose(stats(x, np.ones((6, 4), bool)), stats(padded, mask), atol=1e-6)


def test_confidence_penalty_is_bce_minus_mean_distance_from_half():
    logits, labels = jnp.asarray([[2.0], [-1.0], [0.5]]), jnp.asarray([1, 1, 0])
    bce = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(jnp.float32)).mean()
    p = jax.nn.sigmoid(logits[:, 0])
    np.testing.assert_allclose(losses.per_example_loss(logits, labels, 0.3).mean(),
                               bce - 0.3 * jnp.abs(p - 0.5).mean(), rtol=1e-6)


def _csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


def test_train_path_trains_only_the_head_and_reuses_the_feature_cache(folder, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    make = lambda n: [(" ".join(rng.choice(["good", "great"] if y else ["bad", "awful"], 3)) + " movie", y)
                      for y in rng.integers(0, 2, n)]
    cfg, test_rows = _cfg(folder, tmp_path), make(16)
    test_counts = np.bincount([y for _, y in test_rows], minlength=2).tolist()
    cfg.data.update(name="csv", inputs="backbone_features", bucket_width=0, train_file=_csv(tmp_path / "tr.csv", make(48)),
                    validation_file=_csv(tmp_path / "va.csv", make(16)), test_file=_csv(tmp_path / "te.csv", test_rows))
    cfg.model.update(name="feature_mlp", head_sizes=(8,), dropout=0.0)
    cfg.train.update(epochs=2, batch_size=16, eval_batch_size=16, loss="sigmoid", confidence_penalty=0.1)
    cfg.backbone.update(template=TEMPLATE + " {mask}", label_words=("bad", "good"))
    cfg.checkpoint.async_save = False
    result = train.train_and_evaluate(cfg, tmp_path / "run1")
    # Only the head is trained: 16*8 + 8 (dense) + 2*8 (BatchNorm scale, bias) + 8 + 1 (output).
    assert result["trainable_params"] == 16 * 8 + 8 + 2 * 8 + 8 + 1
    # Every test text scored once, under its own label.
    assert np.sum(result["confusion_matrix"], axis=1).tolist() == test_counts
    assert len(list((tmp_path / "features").glob("*.npz"))) == 3  # train, validation, test

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")
    monkeypatch.setattr(verbalizer, "Extractor", no_extraction)
    assert train.evaluate(tmp_path / "run1", split="test")["accuracy"] == result["accuracy"]
    cfg.backbone.pooling = "mean"  # every pooling is cached by the same pass
    inputs = verbalizer.FeatureEncoder.create(cfg)
    encoded = inputs.encode_splits(data.load_dataset(cfg.data))
    assert inputs.vocab_size == 16 and encoded["train"].ids.shape == (48, 16)
    report = verbalizer.zero_shot(cfg)
    assert report["num_examples"] == 16 and np.sum(report["confusion_matrix"], axis=1).tolist() == test_counts
    assert report["accuracy"] == np.trace(report["confusion_matrix"]) / 16

def test_backbone_path_errors_are_one_line(tmp_path):
    for path, message in ((str(tmp_path / "missing"), "not a folder"), (str(tmp_path), "no config.json")):
        with pytest.raises(encoders.BackboneError, match=message) as info:
            verbalizer.load_backbone(ml_collections.ConfigDict({"path": path, "dtype": "float32"}))
        assert "\n" not in str(info.value)



@pytest.mark.parametrize("devices, expected", [(1, {1: 1, 2: 2, 3: 4, 8: 8, 20: 8}), (2, {1: 2, 3: 4, 5: 8, 20: 8})])
def test_new_texts_are_extracted_in_the_smallest_batch_that_holds_them(folder, tmp_path, devices, expected):
    """A request of one text runs one backbone row (or one per device), not a whole training batch, and
    gets the features a whole batch gives it."""
    cfg = _cfg(folder, tmp_path)
    cfg.mesh.num_devices = devices
    encoder = verbalizer.FeatureEncoder(cfg, verbalizer.load_backbone(cfg.backbone), folder)
    assert {n: encoder.batch_rows(n) for n in expected} == expected
    texts = ["good film", "it was not very good and the plot was bad bad bad", "awful"]
    rows, _ = verbalizer.encode_windows(encoder.backbone.tokenizer, texts, cfg.backbone.template,
                                        cfg.data.max_length)  # one window a text: a row is a text
    whole = encoder.extractor()(rows, cfg.backbone.batch_size, cfg.backbone.bucket_width)
    np.testing.assert_allclose(np.stack(encoder.encode(texts)), whole[cfg.backbone.pooling], atol=1e-5)
