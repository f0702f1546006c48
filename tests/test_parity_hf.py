"""Whole-model parity with Hugging Face GPT-2 and BERT, built offline from small configs."""

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")  # in the dev extra; CI installs it

from minillm.model.pretrained import (bert_config, bert_from_state_dict, gpt2_config, gpt2_from_state_dict,  # noqa: E402
                                load_bert, load_gpt2)


def small_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def small_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg).eval()


def test_gpt2_logits_match():
    hf = small_gpt2()
    ours = gpt2_from_state_dict(hf.state_dict(), gpt2_config(hf.config.to_dict())).eval()
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_loads_from_a_downloaded_folder(tmp_path):
    hf = small_gpt2()
    hf.save_pretrained(tmp_path)  # what `huggingface-cli download gpt2` leaves: config.json + safetensors
    ours = load_gpt2(tmp_path).eval()
    idx = torch.randint(0, 101, (1, 17))
    with torch.no_grad():
        assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_bert_mlm_logits_match_with_padding_and_token_types():
    hf = small_bert()
    ours = bert_from_state_dict(hf.state_dict(), bert_config(hf.config.to_dict())).eval()
    idx = torch.randint(0, 99, (2, 20))
    types = torch.zeros_like(idx)
    types[:, 10:] = 1
    mask = torch.ones_like(idx)
    mask[1, 14:] = 0
    with torch.no_grad():
        ref = hf(input_ids=idx, token_type_ids=types, attention_mask=mask).logits
        got = ours(idx, token_type_ids=types, attention_mask=mask)[0]
    real = mask.bool()
    assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


def test_bert_loads_from_a_downloaded_folder(tmp_path):
    hf = small_bert()
    hf.save_pretrained(tmp_path)
    ours = load_bert(tmp_path).eval()
    idx = torch.randint(0, 99, (1, 9))
    with torch.no_grad():
        assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gpt2(tmp_path)
