"""The encoder–decoder (minillm/model/seq2seq.py) against PyTorch's own nn.Transformer, nn.MultiheadAttention
and F.cross_entropy, plus the properties that teach: padding is invisible, the decoder cannot see the
future, and a 1-layer model learns the generated date task on a CPU in seconds."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.data.tokenizer import CharTokenizer
from minillm.data.translation import SPECIALS, collate, date_pairs
from minillm.generate.beam import beam_search, greedy_search
from minillm.model.config import ModelConfig
from minillm.model.seq2seq import (CrossAttention, Seq2Seq, Seq2SeqConfig, label_smoothed_cross_entropy,
                                   transformer_lr)


def tiny(**overrides) -> Seq2SeqConfig:
    model = dict(vocab_size=13, n_embd=32, n_head=4, block_size=32, init_std=0.2)
    model.update({k: v for k, v in overrides.items() if k in ModelConfig.__dataclass_fields__})
    rest = {k: v for k, v in overrides.items() if k not in ModelConfig.__dataclass_fields__}
    return Seq2SeqConfig(ModelConfig(**model), **{"n_enc_layer": 2, "n_dec_layer": 2, **rest})


def batch(seed=0, B=3, S=7, T=6, V=13):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, V, (B, S), generator=g)
    tgt = torch.randint(3, V, (B, T + 1), generator=g)
    src[1, 4:] = 0  # padding (pad_id = 0) on both sides
    tgt[2, 3:] = 0
    return src, tgt[:, :-1], tgt[:, 1:]


def test_label_smoothed_loss_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, 2:] = 4  # 4 plays pad
    for eps in (0.0, 0.1, 0.3):
        expected = F.cross_entropy(logits.view(-1, 11), targets.view(-1), label_smoothing=eps, ignore_index=4)
        torch.testing.assert_close(label_smoothed_cross_entropy(logits, targets, eps, ignore_index=4), expected)


def test_transformer_lr_is_the_papers_schedule():
    d, w = 512, 4000
    assert transformer_lr(w, d, w) == pytest.approx((d * w) ** -0.5)  # the peak, 6.99e-4
    assert transformer_lr(w, d, w) == pytest.approx(6.9877e-4, rel=1e-4)
    assert transformer_lr(100, d, w) == pytest.approx(100 * d ** -0.5 * w ** -1.5)  # linear warm-up
    assert transformer_lr(4 * w, d, w) == pytest.approx(transformer_lr(w, d, w) / 2)  # 1/√step decay
    assert transformer_lr(0, d, w) == transformer_lr(1, d, w) > 0


def test_cross_attention_matches_nn_multihead_attention():
    torch.manual_seed(0)
    cfg = ModelConfig(n_embd=32, n_head=4, bias=True)
    ours = CrossAttention(cfg).eval()
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():  # PyTorch stacks q, k, v projections in one (3C, C) matrix
        ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)  # Tq = 5 ≠ Tk = 9
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    expected, _ = ref(x, memory, memory, key_padding_mask=~src_mask)  # PyTorch: True = ignore
    torch.testing.assert_close(ours(x, ours.memory_kv(memory), src_mask), expected)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # PyTorch's note on its own fast path
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_seq2seq_matches_nn_transformer(activation):
    """minillm's pre-norm Seq2Seq against torch.nn.Transformer(norm_first=True) with the same weights."""
    torch.manual_seed(0)
    cfg = tiny(activation=activation)
    ours = Seq2Seq(cfg).eval()
    ref = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128,
                         dropout=0.0, activation=activation, batch_first=True, norm_first=True).eval()

    def norm(dst, src):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)

    with torch.no_grad():
        for mine, theirs in zip(ours.encoder.blocks, ref.encoder.layers):
            theirs.self_attn.in_proj_weight.copy_(mine.attn.qkv.weight)
            theirs.self_attn.in_proj_bias.copy_(mine.attn.qkv.bias)
            norm(theirs.self_attn.out_proj, mine.attn.proj)
            norm(theirs.linear1, mine.ffn.up), norm(theirs.linear2, mine.ffn.down)
            norm(theirs.norm1, mine.norm1), norm(theirs.norm2, mine.norm2)
        for mine, theirs in zip(ours.blocks, ref.decoder.layers):
            theirs.self_attn.in_proj_weight.copy_(mine.self_attn.qkv.weight)
            theirs.self_attn.in_proj_bias.copy_(mine.self_attn.qkv.bias)
            norm(theirs.self_attn.out_proj, mine.self_attn.proj)
            theirs.multihead_attn.in_proj_weight.copy_(torch.cat([mine.cross_attn.q.weight, mine.cross_attn.kv.weight]))
            theirs.multihead_attn.in_proj_bias.copy_(torch.cat([mine.cross_attn.q.bias, mine.cross_attn.kv.bias]))
            norm(theirs.multihead_attn.out_proj, mine.cross_attn.proj)
            norm(theirs.linear1, mine.ffn.up), norm(theirs.linear2, mine.ffn.down)
            norm(theirs.norm1, mine.norm1), norm(theirs.norm2, mine.norm2), norm(theirs.norm3, mine.norm3)
        norm(ref.encoder.norm, ours.encoder.final_norm), norm(ref.decoder.norm, ours.final_norm)
        src, tgt_in, tgt_out = batch()
        S, T = src.shape[1], tgt_in.shape[1]
        # nn.Transformer starts after the embeddings: the paper's √C-scaled tokens plus sinusoids
        src_x = ours.encoder.tok_emb(src) * ours.embed_scale + ours.encoder.pos_emb(torch.arange(S))
        tgt_x = ours.tok_emb(tgt_in) * ours.embed_scale + ours.pos_emb(torch.arange(T))
        future = torch.ones(T, T, dtype=torch.bool).triu(1)  # PyTorch's masks: True = may NOT attend
        h = ref(src_x, tgt_x, tgt_mask=future,
                src_key_padding_mask=src == 0, memory_key_padding_mask=src == 0, tgt_key_padding_mask=tgt_in == 0,
                tgt_is_causal=True)
        expected = ours.lm_head(h)  # (B, T, V)
        logits, loss = ours(src, tgt_in, tgt_out)
    real = tgt_in != 0
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-4)
    assert loss is not None and torch.isfinite(loss)


@pytest.mark.parametrize("variant", [{}, dict(prenorm=False), dict(positional="rotary"),
                                     dict(positional="learned", n_kv_head=2)])
def test_padding_is_invisible_and_the_decoder_cannot_see_the_future(variant):
    """For the pre-norm default, the paper's post-norm, rotary and learned positions, grouped-query heads."""
    torch.manual_seed(0)
    model = Seq2Seq(tiny(**variant)).eval()
    src, tgt_in, _ = batch()
    with torch.no_grad():
        logits, _ = model(src, tgt_in)
        # more source padding changes nothing
        padded, _ = model(F.pad(src, (0, 4), value=0), tgt_in)
        torch.testing.assert_close(padded, logits)
        # changing target token t+1 never changes the logits at positions ≤ t
        t = 2
        changed = tgt_in.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1 - 3) % 10 + 3
        after, _ = model(src, changed)
        torch.testing.assert_close(after[:, :t + 1], logits[:, :t + 1])
        assert not torch.allclose(after[0, t + 1:], logits[0, t + 1:])
        # ... while the source is read: changing a real source token changes every position
        other = src.clone()
        other[0, 0] = other[0, 0] % 12 + 1
        assert not torch.allclose(model(other, tgt_in)[0][0, 0], logits[0, 0])


def test_sdpa_equals_naive_and_weights_are_tied():
    torch.manual_seed(0)
    naive = Seq2Seq(tiny())
    sdpa = Seq2Seq(tiny(attention="sdpa"))
    sdpa.load_state_dict(naive.state_dict())
    src, tgt_in, tgt_out = batch()
    a, b = naive.eval()(src, tgt_in, tgt_out), sdpa.eval()(src, tgt_in, tgt_out)
    real = tgt_in != 0
    torch.testing.assert_close(a[0][real], b[0][real], rtol=1e-5, atol=1e-5)
    assert naive.lm_head.weight is naive.tok_emb.weight is naive.encoder.tok_emb.weight
    untied = Seq2Seq(tiny(tie_weights=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_config_errors_are_one_line_and_name_the_field():
    with pytest.raises(ValueError, match="eos_id"):
        tiny(eos_id=99)
    with pytest.raises(ValueError, match="label_smoothing"):
        tiny(label_smoothing=1.0)
    with pytest.raises(ValueError, match="n_enc_layer"):
        tiny(n_enc_layer=0)


@pytest.mark.usefixtures("one_thread")  # a tiny model on shared cores: a second thread only thrashes
def test_a_one_layer_seq2seq_learns_dates_on_cpu():
    """End to end: 200 steps on generated dates ("3 March 2021" / "March 3, 2021" -> "2021-03-03"), then
    greedy and beam decoding get most held-out dates exactly right (measured: loss ≈ 0.1, 9-10 of 16)."""
    torch.manual_seed(0)
    formats = ("{day} {month} {year}", "{month} {day}, {year}")
    train, test = date_pairs(4000, seed=1, formats=formats), date_pairs(16, seed=2, formats=formats)
    tok = CharTokenizer.from_text("".join(s + t for s, t in train + test), special_tokens=SPECIALS)
    pad, bos, eos = (tok.special_tokens[s] for s in SPECIALS)
    cfg = Seq2SeqConfig(ModelConfig(vocab_size=tok.vocab_size, n_embd=64, n_head=4, block_size=32,
                                    activation="relu"),
                        n_enc_layer=1, n_dec_layer=1, pad_id=pad, bos_id=bos, eos_id=eos, label_smoothing=0.0)
    model = Seq2Seq(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = [(tok.encode(s), tok.encode(t)) for s, t in train]
    for step in range(200):
        src, tgt_in, tgt_out = collate(ids[step * 64 % (len(ids) - 64):][:64], pad, bos, eos)
        _, loss = model(src, tgt_in, tgt_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3  # it starts at ln(V) ≈ 3.7
    model.eval()
    src, _, _ = collate([(tok.encode(s), tok.encode(t)) for s, t in test], pad, bos, eos)
    for tokens, _ in (greedy_search(model, src, 12), beam_search(model, src, beam_size=3, max_new_tokens=12)):
        exact = sum(tok.decode(y) == t for y, (_, t) in zip(tokens, test))
        assert exact >= 6, [tok.decode(y) for y in tokens]


def test_config_roundtrip_keeps_sides_apart():
    cfg = tiny(n_enc_layer=3, n_dec_layer=1)
    assert (cfg.encoder.n_layer, cfg.encoder.causal) == (3, False)
    assert (cfg.decoder.n_layer, cfg.decoder.causal) == (1, True)
    assert dataclasses.replace(cfg, n_dec_layer=2).decoder.n_layer == 2
