"""Data sources, tokenizer and batching: correct on good input, one clear line on bad input."""

import io
import json
import pathlib
import tarfile
import time

import numpy as np
import pytest

from sentiment_jax import config_base, data, input_pipeline, runs, tokenization


def data_cfg(**kw):
    cfg = config_base.base_config().data
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def write_csv(path, rows, header="id,text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def csv_cfg(tmp_path, train_rows, test_rows=None, **kw):
    train = write_csv(tmp_path / "train.csv", train_rows)
    test = write_csv(tmp_path / "test.csv", test_rows or ['9,"fine movie",pos', '10,"bad one",neg'])
    return data_cfg(name="csv", train_file=str(train), test_file=str(test), validation_fraction=0.5, **kw)


GOOD = ['1,"great film",pos', '2,"awful film",neg', '3,"loved it",pos', '4,"hated it",neg']


def test_csv_loads_and_carves_a_stratified_validation_split(tmp_path):
    ds = data.load_dataset(csv_cfg(tmp_path, GOOD))
    assert ds.label_names == ("neg", "pos")
    assert len(ds.splits["train"].texts) == 2 and len(ds.splits["validation"].texts) == 2
    assert sorted(ds.splits["validation"].labels.tolist()) == [0, 1]
    again = data.load_dataset(csv_cfg(tmp_path, GOOD))
    assert again.splits["validation"].texts == ds.splits["validation"].texts  # deterministic


def test_max_test_examples_subsamples_only_the_test_split(tmp_path):
    tests = [f'{i},"film {i}",{"pos" if i % 2 else "neg"}' for i in range(10, 20)]
    full = data.load_dataset(csv_cfg(tmp_path, GOOD, tests))
    ds = data.load_dataset(csv_cfg(tmp_path, GOOD, tests, max_test_examples=4))
    assert len(ds.splits["test"].texts) == 4 and set(ds.splits["test"].texts) <= set(full.splits["test"].texts)
    assert ds.splits["train"].texts == full.splits["train"].texts


@pytest.mark.parametrize("rows,message", [
    (['1,"great",pos', '2,"meh",maybe'], r"train.csv:3: unknown label 'maybe'"),
    (['1,"great",pos', '2,"",neg'], r"train.csv:3: empty text"),
])
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    with pytest.raises(data.DataError, match=message):
        data.load_dataset(csv_cfg(tmp_path, rows, label_names=("neg", "pos")))


def test_missing_column_names_the_field(tmp_path):
    train = write_csv(tmp_path / "train.csv", ['1,"great"'], header="id,review")
    cfg = data_cfg(name="csv", train_file=str(train), test_file=str(train))
    with pytest.raises(data.DataError, match=r"train.csv:2: missing field 'text'"):
        data.load_dataset(cfg)


def test_undecodable_bytes_name_the_file(tmp_path):
    train = tmp_path / "train.csv"
    train.write_bytes(b"id,text,label\n1,caf\xe9 awful,neg\n")
    with pytest.raises(data.DataError, match=r"train.csv: not valid UTF-8"):
        data.load_dataset(data_cfg(name="csv", train_file=str(train), test_file=str(train)))


def test_missing_file_and_empty_split(tmp_path):
    with pytest.raises(data.DataError, match="file not found"):
        data.load_dataset(data_cfg(name="csv", train_file=str(tmp_path / "nope.csv"), test_file="x"))
    empty = write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(data.DataError, match="no rows; the split is empty"):
        data.load_dataset(data_cfg(name="csv", train_file=str(empty), test_file=str(empty)))
    train = write_csv(tmp_path / "one.csv", ['1,"great",pos'])
    with pytest.raises(data.DataError, match="validation split is empty"):
        data.load_dataset(data_cfg(name="csv", train_file=str(train), test_file=str(train),
                                   validation_fraction=0.0))


def test_jsonl_with_custom_fields(tmp_path):
    rows = [{"review": "good", "stars": "pos"}, {"review": "bad", "stars": "neg"}] * 2
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ds = data.load_dataset(data_cfg(name="jsonl", train_file=str(f), test_file=str(f), text_field="review",
                                    label_field="stars", validation_fraction=0.5))
    assert ds.splits["test"].texts == ["good", "bad", "good", "bad"]
    f.write_text('{"review": "good", "stars": "pos"}\n{not json}\n')
    with pytest.raises(data.DataError, match=r"d.jsonl:2: not valid JSON"):
        data.load_dataset(data_cfg(name="jsonl", train_file=str(f), test_file=str(f), text_field="review",
                                   label_field="stars"))


def test_unknown_dataset_name():
    with pytest.raises(data.DataError, match="unknown dataset 'imbd'"):
        data.load_dataset(data_cfg(name="imbd"))


def fake_imdb_archive(path: pathlib.Path):
    """Three reviews per split and label, and three unlabelled ones (train/unsup) as the official release has."""
    folders = {"pos": "A fine film.<br />Loved it", "neg": "Dull and long"}
    with tarfile.open(path, "w:gz") as tar:
        for split, label, text in [(s, label, text) for s in ("train", "test") for label, text in folders.items()] + [
                ("train", "unsup", "Unrated")]:
            for i in range(3):
                raw = f"{text} {i}".encode()
                info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_7.txt")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return path


def test_imdb_from_archive_and_from_folder(tmp_path):
    archive = fake_imdb_archive(tmp_path / "aclImdb_v1.tar.gz")
    ds = data.load_dataset(data_cfg(name="imdb", path=str(tmp_path), validation_fraction=1 / 3))
    assert ds.label_names == ("neg", "pos")
    assert len(ds.splits["test"].texts) == 6 and len(ds.splits["train"].texts) == 4
    folder = tmp_path / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    archive.unlink()
    again = data.load_dataset(data_cfg(name="imdb", path=str(folder / "aclImdb"), validation_fraction=1 / 3))
    assert sorted(again.splits["test"].texts) == sorted(ds.splits["test"].texts)
    assert ds.unlabeled == again.unlabeled == []  # read only when asked for
    more = data.load_dataset(data_cfg(name="imdb", path=str(folder / "aclImdb"), validation_fraction=1 / 3,
                                      unlabeled=True))
    assert sorted(more.unlabeled) == ["Unrated 0", "Unrated 1", "Unrated 2"]
    assert sorted(more.splits["train"].texts + more.splits["validation"].texts) == sorted(
        ds.splits["train"].texts + ds.splits["validation"].texts)


def test_unlabeled_texts_from_a_source_without_them_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="has no unlabeled texts"):
        data.load_dataset(csv_cfg(tmp_path, GOOD, unlabeled=True))


def test_imdb_offline_fails_fast_naming_the_path_option(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(data, "IMDB_URL", "http://127.0.0.1:9/aclImdb_v1.tar.gz")  # nothing listens
    t0 = time.time()
    with pytest.raises(data.DataError, match=r"--config.data.path"):
        data.load_dataset(data_cfg(name="imdb"))
    assert time.time() - t0 < 15


def test_real_imdb_archive(real_data):
    ds = data.load_dataset(data_cfg(name="imdb", path=str(real_data)))
    assert len(ds.splits["test"].texts) == 25000
    assert len(ds.splits["train"].texts) + len(ds.splits["validation"].texts) == 25000
    assert ds.splits["test"].labels.mean() == 0.5


def test_real_nusax(real_data):
    ds = data.load_dataset(data_cfg(name="nusax_senti", language="english", path=str(real_data)))
    assert ds.label_names == ("negative", "neutral", "positive")
    assert [len(ds.splits[s].texts) for s in ("train", "validation", "test")] == [500, 100, 400]
    assert np.bincount(ds.splits["test"].labels).tolist() == [153, 96, 151]
    with pytest.raises(data.DataError, match="unknown NusaX language 'klingon'"):
        data.load_dataset(data_cfg(name="nusax_senti", language="klingon", path=str(real_data)))


def test_real_nusax_pools_train_splits_of_several_languages(real_data):
    one = lambda lang: data.load_dataset(data_cfg(name="nusax_senti", language=lang, path=str(real_data))).splits
    pooled = data.load_dataset(data_cfg(name="nusax_senti", language="indonesian", path=str(real_data),
                                        train_languages="english, indonesian,english")).splits
    english, indonesian = one("english"), one("indonesian")
    assert pooled["train"].texts == english["train"].texts + indonesian["train"].texts
    assert pooled["train"].labels.tolist() == english["train"].labels.tolist() + indonesian["train"].labels.tolist()
    for split in ("validation", "test"):  # still the target language's, untouched
        assert pooled[split].texts == indonesian[split].texts
        assert pooled[split].labels.tolist() == indonesian[split].labels.tolist()
    everything = data.load_dataset(data_cfg(name="nusax_senti", language="english", path=str(real_data),
                                            train_languages="all")).splits
    assert len(everything["train"].texts) == 500 * len(data.NUSAX_LANGUAGES)


def test_real_nusax_train_ids_of_every_language_are_disjoint_from_test_ids(real_data):
    """Why pooling is leak-free: the corpus is parallel, so no language's train sentence is a test sentence."""
    import csv

    def ids(lang, split):
        text = (real_data / "nusax_senti" / lang / f"{split}.csv").read_text()
        return {row["id"] for row in csv.DictReader(io.StringIO(text))}

    test = ids("indonesian", "test")
    assert all(ids(lang, "test") == test for lang in data.NUSAX_LANGUAGES)
    assert all(not ids(lang, "train") & test for lang in data.NUSAX_LANGUAGES)


def test_nusax_train_languages_are_checked_before_reading():
    cfg = data_cfg(name="nusax_senti", language="english", path="/nonexistent")
    assert data.nusax_train_languages(cfg) == ("english",)
    cfg.train_languages = "all"
    assert data.nusax_train_languages(cfg) == data.NUSAX_LANGUAGES
    cfg.train_languages = "english,klingon"
    with pytest.raises(data.DataError, match="unknown NusaX language 'klingon'; choose one of"):
        data.load_dataset(cfg)
    cfg.train_languages = " , "
    with pytest.raises(data.DataError, match="names no language"):
        data.nusax_train_languages(cfg)


def test_word_tokenizer_vocabulary_and_round_trip(tmp_path):
    tok = tokenization.WordTokenizer.fit(["The film<br />was GREAT", "the film was bad", "the end"], vocab_size=5)
    assert tok.words == ["the", "film", "was"]  # 0 pad, 1 unk, then by frequency
    ids = tok.encode(["The film<br />was great!"])[0]
    assert ids.tolist() == [2, 3, 4, tokenization.UNK_ID]
    runs.save_encoder(tok, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()  # not Hugging Face's file name: not its format
    assert runs.load_encoder(tmp_path, None).encode(["the film was great"])[0].tolist() == ids.tolist()


def test_pad_and_truncate_sides():
    seqs = [np.array([1, 2, 3, 4]), np.array([5])]
    ids, lengths = tokenization.pad(seqs, 3, padding="pre", truncation="pre")
    assert ids.tolist() == [[2, 3, 4], [0, 0, 5]] and lengths.tolist() == [3, 1]
    ids, _ = tokenization.pad(seqs, 3, padding="post", truncation="post")
    assert ids.tolist() == [[1, 2, 3], [5, 0, 0]]
    with pytest.raises(ValueError, match="padding must be 'pre' or 'post'"):
        tokenization.pad(seqs, 3, padding="left")


@pytest.mark.parametrize("padding", ["pre", "post"])
def test_batches_cover_every_example_once_and_trim_to_buckets(padding):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=103)
    ids, lens = tokenization.pad([np.full(n, 5) for n in lengths], 40, padding=padding)
    split = input_pipeline.Encoded(ids, lens, np.arange(103, dtype=np.int32))
    batches = input_pipeline.Batches(split, 16, padding=padding, shuffle=True, seed=3, bucket_width=8)
    seen = []
    for _, b in batches.epoch(0):
        assert b["ids"].shape[1] % 8 == 0 or b["ids"].shape[1] == 40
        assert (b["mask"].sum(1) == np.where(b["weight"] > 0, lens[b["label"]], 0)).all()
        assert ((b["ids"] != 0) == b["mask"]).all()
        seen.extend(b["label"][b["weight"] > 0].tolist())
    assert sorted(seen) == list(range(103))
    assert [x.tolist() for x in batches.order(1)] == [x.tolist() for x in batches.order(1)]
    assert [x.tolist() for x in batches.order(1)] != [x.tolist() for x in batches.order(2)]
    resumed = [b["label"].tolist() for _, b in batches.epoch(1, start=3)]
    assert resumed == [b["label"].tolist() for _, b in batches.epoch(1)][3:]


def test_huggingface_local_folder_and_offline_hub_name(tmp_path):
    for split in ("train", "test"):
        rows = [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}] * 3
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = data.load_dataset(data_cfg(name="huggingface", hf_name=str(tmp_path), label_names=("neg", "pos"),
                                    validation_fraction=1 / 3))
    assert ds.splits["test"].labels.tolist() == [1, 0] * 3
    t0 = time.time()
    with pytest.raises(data.DataError, match="could not load Hugging Face dataset 'no-such/dataset'"):
        data.load_dataset(data_cfg(name="huggingface", hf_name="no-such/dataset"))
    assert time.time() - t0 < 30


def test_tfds_unprepared_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="not prepared"):
        data.load_dataset(data_cfg(name="tfds", tfds_name="imdb_reviews", path=str(tmp_path)))


def test_huggingface_subword_tokenizer_from_a_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "good": 1, "film": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_truncation(2)  # built-in truncation must be overridden by ours
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = config_base.base_config().data.tokenizer
    cfg.kind, cfg.path = "huggingface", str(tmp_path)
    hf = tokenization.build(cfg, [])
    assert hf.encode(["good film good zzz"])[0].tolist() == [1, 2, 1, 0]
    run = tmp_path / "run"
    run.mkdir()
    runs.save_encoder(hf, run)
    assert runs.load_encoder(run, None).encode(["film good"])[0].tolist() == [2, 1]
    saved = Tokenizer.from_file(str(run / "tokenizer.json"))  # a real `tokenizers` file
    assert saved.encode("film good zzz").ids == [2, 1, 0]


# ---------------------------------------------------------------------------------------
# Hostile files: numbers for names, byte-order marks, very long fields, one class.


def test_integer_labels_beside_named_training_labels_are_an_error_naming_file_line_and_fix(tmp_path):
    cfg = csv_cfg(tmp_path, GOOD, ['9,"fine movie",pos', '10,"bad one",0'])
    with pytest.raises(data.DataError) as e:
        data.load_dataset(cfg)
    message = str(e.value)
    assert "test.csv:3: label '0' is a number but the training labels are names ['neg', 'pos']" in message
    assert "--config.data.label_names=neg,pos" in message and "\n" not in message
    jsonl = tmp_path / "test.jsonl"  # JSON numbers too
    jsonl.write_text('{"text": "fine", "label": "pos"}\n{"text": "bad", "label": 1}\n')
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": t, "label": l}) for t, l in
                               [("good", "pos"), ("bad", "neg"), ("great", "pos"), ("awful", "neg")]))
    with pytest.raises(data.DataError, match=r"test.jsonl:2: label '1' is a number"):
        data.load_dataset(data_cfg(name="jsonl", train_file=str(train), test_file=str(jsonl),
                                   validation_fraction=0.5))


def test_integer_labels_are_class_indices_when_label_names_say_so_or_every_split_is_numeric(tmp_path):
    ds = data.load_dataset(csv_cfg(tmp_path, GOOD, ['9,"fine movie",1', '10,"bad one",neg'],
                                   label_names=("neg", "pos")))
    assert ds.splits["test"].labels.tolist() == [1, 0]
    numeric = [f'{i},"film {i}",{i % 3 + 1}' for i in range(12)]  # star ratings 1..3 in every split
    ds = data.load_dataset(csv_cfg(tmp_path, numeric, ['9,"x",3', '10,"y",1']))
    assert ds.label_names == ("1", "2", "3") and ds.splits["test"].labels.tolist() == [2, 0]
    ten = [f'{i},"film {i}",{i % 11}' for i in range(22)]  # sorted as numbers: "10" after "9"
    assert data.load_dataset(csv_cfg(tmp_path, ten, ['9,"x",10', '10,"y",2'])).label_names[-2:] == ("9", "10")
    with pytest.raises(data.DataError, match=r"test.csv:2: unknown label '4'"):  # numeric, but no such class
        data.load_dataset(csv_cfg(tmp_path, numeric, ['9,"x",4']))


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "\n".join(f"{t},{l}" for t, l in [("good", "pos"), ("bad", "neg")] * 2) + "\n",
                     encoding="utf-8-sig")
    assert train.read_bytes().startswith(b"\xef\xbb\xbftext")
    ds = data.load_dataset(data_cfg(name="csv", train_file=str(train), test_file=str(train), validation_fraction=0.5))
    assert ds.splits["test"].texts == ["good", "bad", "good", "bad"]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n' * 2)
    ds = data.load_dataset(data_cfg(name="jsonl", train_file=str(jsonl), test_file=str(jsonl),
                                    validation_fraction=0.5))
    assert ds.splits["test"].texts == ["good", "bad", "good", "bad"]


def test_long_csv_fields_read_up_to_the_stated_limit_then_name_file_and_line(tmp_path, monkeypatch):
    long = "good " * 40_000  # 200,000 characters, past the csv module's default of 131,072
    rows = ['1,"great film",pos', f'2,"{long}",pos', '3,"awful",neg', '4,"dull",neg']
    ds = data.load_dataset(csv_cfg(tmp_path, rows, label_names=("neg", "pos")))
    assert max(len(t) for s in ds.splits.values() for t in s.texts) == len(long)
    monkeypatch.setattr(data, "MAX_FIELD_CHARS", 100_000)
    with pytest.raises(data.DataError) as e:
        data.load_dataset(csv_cfg(tmp_path, rows, label_names=("neg", "pos")))
    assert str(e.value).endswith("train.csv:3: unreadable CSV (field larger than field limit (100000)); a field may "
                                 "hold up to 100,000 characters, so shorten or split longer texts")


def test_a_training_split_with_one_class_is_an_error(tmp_path):
    rows = ['1,"great film",pos', '2,"loved it",pos', '3,"superb",pos', '4,"fine",pos']
    for label_names in ((), ("neg", "pos")):
        with pytest.raises(data.DataError, match="every training example has the label 'pos'"):
            data.load_dataset(csv_cfg(tmp_path, rows, ['9,"fine movie",pos'], label_names=label_names))
