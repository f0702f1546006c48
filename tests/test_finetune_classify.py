"""Task heads and classification fine-tuning: full, frozen trunk and LoRA (model/heads.py, finetune/)."""

import json

import pytest
import torch
from torch.testing import assert_close

from minillm.weights.checkpoint import CheckpointError, load_model, save_model
from minillm.cli import main
from minillm.data.pairs import NSP_SPECIAL_TOKENS
from minillm.data.tokenizer import CharTokenizer
from minillm.finetune.classify import build_classifier, encode_texts, finetune_classifier
from minillm.finetune.config import FinetuneConfig
from minillm.finetune.lora import expected_lora_parameters
from minillm.model.config import ModelConfig
from minillm.model.heads import SequenceClassifier
from minillm.model.transformer import CausalLM, MaskedLM

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ,.'-!"))


def encoder(nsp=True):
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS, special_tokens=NSP_SPECIAL_TOKENS)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32, causal=False,
                      n_token_types=2, nsp_head=nsp, positional="learned")
    return MaskedLM(cfg), tok


def decoder():
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32)
    return CausalLM(cfg), tok


def write_csv(path, rows, header=("text", "label")):
    path.write_text("\n".join([",".join(header)] + [f"{t},{y}" for t, y in rows]) + "\n")
    return path


def tiny_task(tmp_path, n=120):
    """Label = whether the text mentions 'good' or 'bad': learnable in a few dozen steps."""
    rows = [(f"{'a good' if i % 2 else 'a bad'} film {'x' * (i % 5)}", "pos" if i % 2 else "neg") for i in range(n)]
    return write_csv(tmp_path / "task.csv", rows)


def test_last_token_pooling_reads_the_last_real_token_and_ignores_padding():
    lm, _ = decoder()
    clf = SequenceClassifier.from_pretrained(lm, ["a", "b"]).eval()
    assert clf.pooling == "last"
    idx = torch.randint(0, 20, (2, 10))
    mask = torch.ones_like(idx)
    mask[0, 6:] = 0
    logits = clf(idx, attention_mask=mask)[0]
    idx2 = idx.clone()
    idx2[0, 6:] = 3  # other padding
    assert_close(clf(idx2, attention_mask=mask)[0], logits)
    assert_close(clf(idx[:1, :6])[0], logits[:1])  # the same as the unpadded row alone
    idx3 = idx.clone()
    idx3[0, 2] = (idx[0, 2] + 1) % 20  # an earlier token does matter
    assert not torch.allclose(clf(idx3, attention_mask=mask)[0][0], logits[0])


def test_cls_pooling_uses_the_pretrained_pooler_and_mean_pooling_without_cls():
    lm, tok = encoder()
    clf, wrap = build_classifier(lm, tok, ["a", "b"])
    assert wrap and clf.pooling == "cls"
    assert_close(clf.pooler.dense.weight, lm.pooler.dense.weight)  # the NSP-trained pooler is kept
    assert_close(clf.transformer.tok_emb.weight, lm.transformer.tok_emb.weight)
    plain = CharTokenizer(CHARS, special_tokens=("[PAD]", "[MASK]"))
    clf2, wrap2 = build_classifier(lm, plain, ["a", "b"])
    assert not wrap2 and clf2.pooling == "mean"
    h = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert_close(clf2.pool(h, mask), torch.stack([h[0, :3].mean(0), h[1].mean(0)]))
    with pytest.raises(ValueError, match="'cls' needs an encoder"):
        SequenceClassifier(decoder()[0].cfg, ["a", "b"], "cls")


def test_long_texts_are_cut_and_counted():
    _, tok = encoder()
    rows, cut = encode_texts(["a" * 10, "b" * 60], tok, 48, wrap=True)
    assert cut == 1 and len(rows[1]) == 48 and rows[1][0] == tok.special_tokens["[CLS]"]
    assert rows[1][-1] == tok.special_tokens["[SEP]"] and len(rows[0]) == 12


@pytest.mark.parametrize("mode", ["full", "frozen", "lora"])
def test_finetune_modes_train_what_they_should_and_save_a_loadable_classifier(tmp_path, mode):
    lm, tok = encoder()
    trunk_before = {k: v.clone() for k, v in lm.transformer.state_dict().items()}
    cfg = FinetuneConfig(data=str(tiny_task(tmp_path)), max_iters=40, eval_interval=20, batch_size=16,
                         learning_rate=3e-3, out_dir=str(tmp_path / "out"), freeze_trunk=mode == "frozen",
                         lora_rank=4 if mode == "lora" else 0, warmup_iters=5)
    r = finetune_classifier(lm, tok, cfg, progress=False, say=lambda s: None)
    model = r["model"]
    head = sum(p.numel() for n in ("pooler", "head") for p in getattr(model, n).parameters())
    if mode == "full":
        assert r["params"]["trainable"] == r["params"]["total"]
    elif mode == "frozen":
        assert r["params"]["trainable"] == head  # a linear probe: the head (with BERT's pooler) only
        for k, v in model.transformer.state_dict().items():
            assert torch.equal(v, trunk_before[k]), k
    else:  # exactly r·(in+out) per adapted layer, plus the head
        assert r["params"]["trainable"] == expected_lora_parameters(lm, 4, ("qkv", "proj")) + head
        assert (tmp_path / "out" / "adapter" / "adapter.safetensors").exists()
        assert (tmp_path / "out" / "adapter" / "head.safetensors").exists()
    if mode != "frozen":  # (a random frozen trunk's [CLS] holds little to probe: no accuracy promised)
        assert r["report"]["accuracy"] >= 0.9
    # the saved checkpoint is a plain classifier (LoRA merged) with the same outputs
    loaded, tok2, meta = load_model(tmp_path / "out")
    assert isinstance(loaded, SequenceClassifier) and meta["classifier"]["labels"] == ["neg", "pos"]
    assert not any("lora" in k for k in loaded.state_dict())
    idx = torch.tensor([[tok.special_tokens["[CLS]"], *tok.encode("a good film"), tok.special_tokens["[SEP]"]]])
    model.eval()
    with torch.no_grad():
        assert_close(loaded(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)


def test_a_decoder_fine_tunes_too(tmp_path):
    lm, tok = decoder()
    cfg = FinetuneConfig(data=str(tiny_task(tmp_path)), max_iters=40, eval_interval=40, learning_rate=3e-3,
                         out_dir=str(tmp_path / "out"), warmup_iters=5)
    r = finetune_classifier(lm, tok, cfg, progress=False, say=lambda s: None)
    assert r["model"].pooling == "last" and r["report"]["accuracy"] >= 0.9


def _checkpoint(tmp_path, lm, tok, name="base"):
    save_model(tmp_path / name, lm, tok)
    return str(tmp_path / name)


def test_cli_classify_full_and_lora_with_baseline(tmp_path, capsys):
    lm, tok = encoder()
    base = _checkpoint(tmp_path, lm, tok)
    data = str(tiny_task(tmp_path))
    assert main(["finetune", base, f"--data={data}", "--max_iters=20", "--eval_interval=10",
                 f"--out_dir={tmp_path / 'full'}", "--baseline"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out and "bag-of-words baseline" in out
    report = json.loads((tmp_path / "full" / "finetune_report.json").read_text())
    assert report["mode"] == "full" and "baseline" in report
    assert main(["finetune", base, f"--data={data}", "--max_iters=10", "--lora_rank=8",
                 f"--out_dir={tmp_path / 'lora'}"]) == 0
    assert "(lora)" in capsys.readouterr().out
    # the same out_dir again: refused, not overwritten
    assert main(["finetune", base, f"--data={data}", "--max_iters=10", f"--out_dir={tmp_path / 'lora'}"]) == 2
    assert "--overwrite=true" in capsys.readouterr().err


@pytest.mark.parametrize("content, columns, message", [
    ([("a good film", "pos")], ["--label_column=stars"], "label column 'stars'"),
    ([("a good film", "1.5"), ("a bad film", "0")], [], "labels must be ints"),
])
def test_cli_bad_data_is_one_line(tmp_path, capsys, content, columns, message):
    lm, tok = encoder()
    base = _checkpoint(tmp_path, lm, tok)
    path = write_csv(tmp_path / "bad.csv", content * 20)
    if message == "labels must be ints":  # a float label in a JSONL file (CSV cells are strings)
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(json.dumps({"text": t, "label": float(y)}) for t, y in content * 20))
    assert main(["finetune", base, f"--data={path}", "--max_iters=5", f"--out_dir={tmp_path / 'o'}", *columns]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_empty_split_lora_on_quantized_and_vocabulary_mismatch(tmp_path, capsys):
    from minillm.compress.quant import quantize_model

    lm, tok = encoder()
    base = _checkpoint(tmp_path, lm, tok)
    empty = write_csv(tmp_path / "empty.csv", [])
    assert main(["finetune", base, f"--data={empty}", f"--out_dir={tmp_path / 'o'}"]) == 2
    assert "0 rows" in capsys.readouterr().err

    q = quantize_model(encoder()[0], "int8")
    qbase = _checkpoint(tmp_path, q, tok, "quantized")
    assert main(["finetune", qbase, f"--data={tiny_task(tmp_path)}", "--lora_rank=8", f"--out_dir={tmp_path / 'o'}"]) == 2
    assert "LoRA on a quantized model is not supported" in capsys.readouterr().err

    big = CharTokenizer(CHARS + list("0123456789ABCDEFGHIJ"), special_tokens=NSP_SPECIAL_TOKENS)
    (tmp_path / "base" / "tokenizer.json").write_text(json.dumps(big.to_dict()))
    from minillm.weights.checkpoint import write_manifest

    write_manifest(tmp_path / "base")
    with pytest.raises(CheckpointError, match="belong to different models"):
        load_model(base)
    assert main(["finetune", base, f"--data={tiny_task(tmp_path)}", f"--out_dir={tmp_path / 'o'}"]) == 2
    assert "different models" in capsys.readouterr().err


def test_pooling_can_be_chosen_and_reinit_starts_from_random_weights(tmp_path):
    lm, tok = encoder()
    cfg = FinetuneConfig(data=str(tiny_task(tmp_path)), max_iters=2, eval_interval=2, pooling="mean", reinit=True,
                         out_dir=str(tmp_path / "out"))
    r = finetune_classifier(lm, tok, cfg, progress=False, say=lambda s: None)
    assert r["model"].pooling == "mean" and r["model"].pooler is None
    assert not torch.equal(r["model"].transformer.tok_emb.weight, lm.transformer.tok_emb.weight)  # not lm's weights
    with pytest.raises(ValueError, match="pooling=cls needs"):
        build_classifier(decoder()[0], decoder()[1], ["a", "b"], "cls")
    with pytest.raises(ValueError, match="pooling must be"):
        FinetuneConfig(pooling="max")
