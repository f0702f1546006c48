"""Next-sentence pairs and BERT's MLM + NSP pre-training (data/pairs.py, model/transformer.py)."""

import numpy as np
import pytest
import torch

from minillm.data.pairs import IS_NEXT, NOT_NEXT, NSP_SPECIAL_TOKENS, nsp_pairs
from minillm.data.tokenizer import CharTokenizer
from minillm.model.config import ModelConfig
from minillm.model.transformer import MaskedLM


def stream(n=3000):
    """A token stream where each token is its own position mod 50: a true continuation is visible."""
    tok = CharTokenizer([chr(65 + i) for i in range(50)], special_tokens=NSP_SPECIAL_TOKENS)
    return np.arange(n) % 50, tok


def test_pairs_have_bert_layout_and_segment_ids():
    tokens, tok = stream()
    x, types, labels = nsp_pairs(tokens, 64, 32, tok, torch.Generator().manual_seed(0))
    cls_id, sep_id = tok.special_tokens["[CLS]"], tok.special_tokens["[SEP]"]
    assert x.shape == types.shape == (64, 32) and labels.shape == (64,)
    for r in range(64):
        assert x[r, 0] == cls_id and x[r, -1] == sep_id
        seps = (x[r] == sep_id).nonzero().flatten().tolist()
        assert len(seps) == 2  # one after A, one after B
        a_end = seps[0]
        assert (types[r, :a_end + 1] == 0).all() and (types[r, a_end + 1:] == 1).all()
        a, b = x[r, 1:a_end], x[r, a_end + 1:-1]
        assert len(a) >= 1 and len(b) >= 1
        follows = (b[0] - a[-1]) % 50 == 1  # the stream counts up: the true next token is +1
        if labels[r] == IS_NEXT:
            assert follows
        else:
            assert labels[r] == NOT_NEXT


def test_random_b_never_overlaps_the_true_text_and_the_split_is_50_50():
    tokens = np.arange(5000)  # every id unique: overlap would show as shared ids
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(5000)], special_tokens=NSP_SPECIAL_TOKENS)
    x, types, labels = nsp_pairs(tokens, 2000, 40, tok, torch.Generator().manual_seed(1))
    assert abs(labels.float().mean().item() - 0.5) < 0.04  # 2000 coins: 3.6 standard deviations
    specials = set(tok.special_tokens.values())
    for r in (labels == NOT_NEXT).nonzero().flatten().tolist():
        a = [t for t, s in zip(x[r].tolist(), types[r].tolist()) if s == 0 and t not in specials]
        b = [t for t, s in zip(x[r].tolist(), types[r].tolist()) if s == 1 and t not in specials]
        true_span = set(range(a[0], a[0] + 37))  # A and its true continuation: budget = 40 - 3
        assert not true_span & set(b)


def test_same_seed_same_pairs_and_bad_inputs():
    tokens, tok = stream()
    one = nsp_pairs(tokens, 8, 16, tok, torch.Generator().manual_seed(3))
    two = nsp_pairs(tokens, 8, 16, tok, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        nsp_pairs(tokens, 8, 16, CharTokenizer([chr(65 + i) for i in range(50)], ("[PAD]", "[MASK]")))
    with pytest.raises(ValueError, match="too few"):
        nsp_pairs(tokens[:30], 8, 16, tok)
    with pytest.raises(ValueError, match="block_size"):
        nsp_pairs(tokens, 8, 4, tok)


def test_nsp_head_loss_is_mlm_plus_nsp_and_learns_the_task():
    torch.manual_seed(0)
    tokens, tok = stream()
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32, n_token_types=2,
                      causal=False, nsp_head=True, positional="learned")
    model = MaskedLM(cfg)
    gen = torch.Generator().manual_seed(0)
    x, types, nsp = nsp_pairs(tokens, 16, 24, tok, gen)
    labels = torch.full_like(x, -100)
    labels[:, 2] = x[:, 2]
    logits, nsp_logits = model.pretraining_logits(x, token_type_ids=types)
    _, joint = model(x, labels, token_type_ids=types, next_sentence_labels=nsp)
    _, mlm_only = model(x, labels, token_type_ids=types)
    nsp_only = torch.nn.functional.cross_entropy(nsp_logits, nsp)
    torch.testing.assert_close(joint, mlm_only + nsp_only)
    # the joint loss trains both heads: one fixed batch is memorised (gradients reach the NSP head
    # through the pooler, and the MLM head through the decoder)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = model(x, labels, token_type_ids=types, next_sentence_labels=nsp)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits, nsp_logits = model.pretraining_logits(x, token_type_ids=types)
    acc = (nsp_logits.argmax(-1) == nsp).float().mean()
    assert (logits[:, 2].argmax(-1) == x[:, 2]).all()
    assert acc == 1.0


def test_nsp_labels_need_the_head():
    cfg = ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, causal=False)
    with pytest.raises(ValueError, match="nsp_head"):
        MaskedLM(cfg)(torch.zeros(1, 8, dtype=torch.long), next_sentence_labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="causal=False"):
        ModelConfig(nsp_head=True)
