"""Whole-model parity with Hugging Face GPT-2 and BERT, built offline from small configs."""

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")  # in the dev extra; CI installs it

from minillm.weights.huggingface import (bert_config, bert_from_state_dict, gpt2_config, gpt2_from_state_dict,  # noqa: E402
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


# --- the Llama family: Llama, Qwen2, Mistral, built offline from small configs --------------------

from minillm.weights.huggingface import is_hf_folder, llama_config, load_hf_folder, load_llama  # noqa: E402

LLAMA_SIZES = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)


def small_hf(cls_name: str, **kw):
    torch.manual_seed(0)
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    model = getattr(transformers, cls_name)(config_cls(**{**LLAMA_SIZES, **kw})).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them so they are checked
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


LLAMAS = {
    "llama-mha": ("LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-gqa-theta500k": ("LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500000.0)),
    "llama-mqa-tied": ("LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_theta=500000.0,
        # D = 12, θ = 500000: wavelengths 6.3, 56, 500, ... tokens. With L = 64, low 1, high 8, the
        # first pair is kept (λ < L/8), the second blended, the rest divided by 8: every branch runs
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
                          original_max_position_embeddings=64))),
    "llama-linear-rope-scaling": ("LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_scaling=dict(rope_type="linear", factor=4.0))),
    "qwen2-gqa-bias": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, max_position_embeddings=64)),
    "qwen2-tied": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                            max_position_embeddings=64)),
    "mistral-sliding-window": ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=5,
                                                          max_position_embeddings=64)),
}


@pytest.mark.parametrize("name", LLAMAS)
def test_llama_family_logits_match(name, tmp_path):
    cls_name, kw = LLAMAS[name]
    hf = small_hf(cls_name, **kw)
    hf.save_pretrained(tmp_path)
    ours = load_llama(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_llama_config_reads_the_shape():
    hf = small_hf("Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True)
    cfg = llama_config(hf.config.to_dict())
    assert (cfg.n_head, cfg.kv_heads, cfg.head_dim) == (4, 2, 12)
    assert cfg.qkv_bias is True and cfg.bias is False and cfg.tie_weights is True
    assert cfg.sliding_window is None  # Qwen2 records a window size but does not use it by default


def test_sharded_llama_folder_loads(tmp_path):
    hf = small_hf("LlamaForCausalLM", num_key_value_heads=2)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")  # many model-0000x-of-0000y.safetensors
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = load_llama(tmp_path).eval()
    idx = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_llama_cached_greedy_decoding_matches_hf(tmp_path):
    hf = small_hf("LlamaForCausalLM", num_key_value_heads=2)
    hf.save_pretrained(tmp_path)
    ours = load_llama(tmp_path).eval()
    from minillm.generate.sampling import generate
    idx = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(idx, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, idx, 12, temperature=0.0), ref)


def test_unknown_rope_scaling_is_refused(tmp_path):
    hf = small_hf("LlamaForCausalLM", num_key_value_heads=2)
    cfg = hf.config.to_dict()
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        llama_config(cfg)


def save_hf_tokenizer(folder):
    """A byte-level BPE tokenizer.json written by the `tokenizers` library, as model folders have."""
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=96, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["hello world, hello minillm"] * 20, trainer)
    bpe.save(str(folder / "tokenizer.json"))
    return bpe


def test_load_hf_folder_with_tokenizer(tmp_path):
    hf = small_hf("LlamaForCausalLM", num_key_value_heads=2, vocab_size=260)  # 257 byte-level tokens
    hf.save_pretrained(tmp_path)
    bpe = save_hf_tokenizer(tmp_path)
    assert is_hf_folder(tmp_path)

    model, tok, meta = load_hf_folder(tmp_path, "cpu", attention="sdpa")
    assert model.cfg.attention == "sdpa" and meta["huggingface"]["model_type"] == "llama"
    text = "hello wörld<|endoftext|>"
    ids = tok.encode(text)
    assert ids == bpe.encode(text, add_special_tokens=False).ids and tok.decode(ids) == text
    assert tok.special_tokens == {"<|endoftext|>": 0} and ids[-1] == 0
    assert 0 not in tok.encode(text, allowed_special="none")  # the special token as plain text
    from minillm.data.tokenizer import tokenizer_from_dict
    assert tokenizer_from_dict(tok.to_dict()).encode(text) == ids  # survives a minillm checkpoint
    idx = torch.tensor([ids[:5]])
    with torch.no_grad():
        assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_a_minillm_checkpoint_is_not_an_hf_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model": {"n_layer": 1}}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not is_hf_folder(tmp_path)
    assert not is_hf_folder(tmp_path / "missing")


def test_hf_tokenizer_errors_are_one_line(tmp_path, monkeypatch):
    from minillm.data.tokenizer import HFTokenizer, load_hf_tokenizer
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        load_hf_tokenizer(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer("{}")


def test_hf_folder_survives_a_minillm_checkpoint(tmp_path):
    from minillm.weights.checkpoint import load_model, save_model
    hf = small_hf("Qwen2ForCausalLM", num_key_value_heads=2, vocab_size=260,
                  rope_scaling=dict(rope_type="linear", factor=2.0))
    hf.save_pretrained(tmp_path / "hf")
    save_hf_tokenizer(tmp_path / "hf")
    model, tok, meta = load_hf_folder(tmp_path / "hf")
    extra = {k: v for k, v in meta.items() if k != "model"}  # as minillm.compress.quantize passes it on
    save_model(tmp_path / "ours", model, tok, **extra)
    again, tok2, meta2 = load_model(tmp_path / "ours")
    assert again.cfg == model.cfg and meta2["huggingface"]["model_type"] == "qwen2"
    assert tok2.encode("hello world") == tok.encode("hello world")
    idx = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(again(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    small_hf("LlamaForCausalLM", num_key_value_heads=2).save_pretrained(tmp_path)  # 97 ids
    save_hf_tokenizer(tmp_path)  # 257 ids
    with pytest.raises(ValueError, match="257 tokens, but config.json's vocab_size is 97"):
        load_hf_folder(tmp_path)


# HuggingFaceTB/SmolLM2-135M's config.json (written by transformers 4.40: "rope_theta" and a null
# "rope_scaling" rather than 5.x's "rope_parameters")
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
    "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True, "vocab_size": 49152,
}


def test_smollm2_preset_is_what_its_config_json_loads_as():
    from minillm.model.config import ModelConfig
    assert llama_config(SMOLLM2_135M) == ModelConfig.from_preset("smollm2-135m")


def test_bf16_weights_load_into_an_fp32_model(tmp_path):
    hf = small_hf("LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=True)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)  # as SmolLM2 and Llama are published
    ours = load_llama(tmp_path).eval()
    assert ours.lm_head.weight.dtype == torch.float32
    idx = torch.randint(0, 97, (1, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(ours(idx)[0], hf.float()(idx).logits, atol=1e-5, rtol=1e-5)


def small_bert_config():
    return transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=96, max_position_embeddings=64,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_bert_pretraining_mlm_and_nsp_logits_and_loss_match():
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(small_bert_config()).eval()
    ours = bert_from_state_dict(hf.state_dict(), bert_config(hf.config.to_dict())).eval()
    assert ours.cfg.nsp_head  # the pooler and the NSP head came with the weights
    idx = torch.randint(0, 99, (3, 20))
    types = torch.zeros_like(idx)
    types[:, 9:] = 1
    mask = torch.ones_like(idx)
    mask[2, 15:] = 0
    labels = torch.full_like(idx, -100)
    labels[:, 3] = idx[:, 3]
    labels[1, 12] = idx[1, 12]
    nsp = torch.tensor([0, 1, 1])
    with torch.no_grad():
        ref = hf(input_ids=idx, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsp)
        mlm, nsp_logits = ours.pretraining_logits(idx, token_type_ids=types, attention_mask=mask)
        _, loss = ours(idx, labels, token_type_ids=types, attention_mask=mask, next_sentence_labels=nsp)
    real = mask.bool()
    assert_close(mlm[real], ref.prediction_logits[real], atol=1e-5, rtol=1e-5)
    assert_close(nsp_logits, ref.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)  # L_MLM + L_NSP, the same sum


def test_bert_sequence_classifier_matches_hf():
    from minillm.model.heads import SequenceClassifier

    torch.manual_seed(0)
    cfg = small_bert_config()
    cfg.num_labels = 3
    hf = transformers.BertForSequenceClassification(cfg).eval()
    sd = hf.state_dict()
    # the trunk maps as for pre-training; the pooler and classifier by name
    trunk = bert_from_state_dict({**sd, **{f"cls.predictions.{k}": v for k, v in _dummy_mlm_head(cfg).items()}},
                                 bert_config(hf.config.to_dict()))
    clf = SequenceClassifier(trunk.cfg, labels=["a", "b", "c"], pooling="cls")
    clf.transformer.load_state_dict(trunk.transformer.state_dict())
    clf.pooler.dense.load_state_dict({"weight": sd["bert.pooler.dense.weight"], "bias": sd["bert.pooler.dense.bias"]})
    clf.head.load_state_dict({"weight": sd["classifier.weight"], "bias": sd["classifier.bias"]})
    clf.eval()
    idx = torch.randint(0, 99, (2, 12))
    mask = torch.ones_like(idx)
    mask[0, 7:] = 0
    y = torch.tensor([2, 0])
    with torch.no_grad():
        ref = hf(input_ids=idx, attention_mask=mask, labels=y)
        logits, loss = clf(idx, y, attention_mask=mask)
    assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)


def _dummy_mlm_head(cfg):
    """BertForSequenceClassification has no MLM head; the loader wants one, so give it zeros."""
    C, V = cfg.hidden_size, cfg.vocab_size
    return {"transform.dense.weight": torch.zeros(C, C), "transform.dense.bias": torch.zeros(C),
            "transform.LayerNorm.weight": torch.ones(C), "transform.LayerNorm.bias": torch.zeros(C),
            "bias": torch.zeros(V)}


# --- the encoder–decoder: BART, built offline from a small config ---------------------------------

from minillm.weights.huggingface_seq2seq import bart_config, bart_from_state_dict, load_bart  # noqa: E402


def small_bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=91, d_model=48, encoder_layers=3, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=80,
                                  decoder_ffn_dim=80, max_position_embeddings=64, dropout=0.0,
                                  attention_dropout=0.0, activation_dropout=0.0)
    hf = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random-init biases and norms are 0 and 1: make them count, so a wrong map shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
        hf.final_logits_bias.normal_()
    return hf


def bart_batch():
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(3, 91, (2, 13), generator=gen)
    src_mask = torch.ones_like(src)
    src[1, 9:], src_mask[1, 9:] = 1, 0  # the second sentence is 4 pads shorter (BART's pad id is 1)
    tgt_in = torch.randint(3, 91, (2, 7), generator=gen)
    tgt_in[:, 0] = 2  # decoder_start_token_id
    return src, src_mask, tgt_in


def test_bart_logits_match_with_source_padding():
    hf = small_bart()
    cfg = bart_config(hf.config.to_dict())
    ours = bart_from_state_dict(hf.state_dict(), cfg).eval()
    assert (cfg.n_enc_layer, cfg.n_dec_layer, cfg.pad_id, cfg.bos_id) == (3, 2, 1, 2)
    src, src_mask, tgt_in = bart_batch()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in).logits
        got, _ = ours(src, tgt_in, src_mask=src_mask)
    assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_bart_loads_from_a_downloaded_folder_and_decodes_like_hf(tmp_path):
    hf = small_bart()
    hf.save_pretrained(tmp_path)
    ours = load_bart(tmp_path).eval()
    src, src_mask, tgt_in = bart_batch()
    with torch.no_grad():  # step-by-step decoding with both caches = one teacher-forced pass
        memory = ours.encode(src, src_mask.bool())
        kv, cache = ours.cross_kv(memory), ours.new_cache(2)
        steps = [ours.decode(tgt_in[:, t:t + 1], kv, src_mask.bool(), cache=cache) for t in range(tgt_in.shape[1])]
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in).logits
    assert_close(torch.cat(steps, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_prenorm_bart_variants_are_refused():
    with pytest.raises(ValueError, match="normalize_before"):
        bart_config({**small_bart().config.to_dict(), "normalize_before": True})
