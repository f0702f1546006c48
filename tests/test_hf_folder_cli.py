"""A downloaded Hugging Face Llama-family folder works in every command, as a minillm checkpoint does.

The folder is built offline: a random-init LlamaForCausalLM (grouped-query attention, SmolLM2's
layout at toy size) saved with save_pretrained, and a byte-level BPE tokenizer.json trained with the
`tokenizers` library on a few lines. No download, nothing from a hub.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from minillm.weights.checkpoint import load_model  # noqa: E402
from minillm.cli import main  # noqa: E402
from minillm.generate.sampling import generate  # noqa: E402
from tests.helpers import write_bpe_tokenizer_json  # noqa: E402

TEXT = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smol")
    write_bpe_tokenizer_json(folder, TEXT)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def test_load_model_takes_the_folder_and_matches_hugging_face(hf_folder):
    model, tok, meta = load_model(hf_folder)
    assert model.cfg.n_kv_head == 2 and tok.vocab_size <= model.cfg.vocab_size
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_folder).eval()
    idx = torch.tensor([tok.encode("def add(a, b):")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)
        ours = generate(model, idx, 8, temperature=0.0)
        theirs = hf.generate(idx, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_generate_quantize_and_serve_accept_the_folder(hf_folder, tmp_path, capsys, monkeypatch):
    assert main(["generate", str(hf_folder), "--prompt=def ", "--max_new_tokens=6", "--temperature=0"]) == 0
    fused = capsys.readouterr().out
    assert fused.startswith("def ")
    # --readable runs the written-out layers: the same greedy text as the fused default
    assert main(["generate", str(hf_folder), "--prompt=def ", "--max_new_tokens=6", "--temperature=0",
                 "--readable"]) == 0
    assert capsys.readouterr().out == fused
    assert main(["quantize", str(hf_folder), "--scheme=int8", f"--out={tmp_path / 'q'}", "--gen_tokens=4"]) == 0
    assert "quantized" in capsys.readouterr().out
    assert load_model(tmp_path / "q")[2]["quantization"]["scheme"] == "int8"

    import uvicorn  # serve builds the app, then would listen: stop at the call

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app))
    assert main(["serve", str(hf_folder)]) == 0
    assert "app" in started


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A Hugging Face BERT folder as google's checkpoints come: BertForPreTraining (with the pooler and
    NSP head) and a WordPiece tokenizer.json with [PAD] [UNK] [CLS] [SEP] [MASK], all built offline."""
    folder = tmp_path_factory.mktemp("bert")
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tokenizers.decoders.WordPiece()
    trainer = tokenizers.trainers.WordPieceTrainer(vocab_size=120,
                                                   special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(["a good film", "a bad film", "not good at all", "truly great acting"] * 10, trainer)
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertForPreTraining(cfg).eval().save_pretrained(folder)
    return folder


def test_finetune_takes_a_hugging_face_bert_folder(bert_folder, tmp_path, capsys):
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(f'{{"text": "{"a good film" if i % 2 else "a bad film"}", "label": "{"pos" if i % 2 else "neg"}"}}'
                              for i in range(60)))
    assert main(["finetune", str(bert_folder), f"--data={data}", "--max_iters=40", "--eval_interval=40", "--warmup_iters=5",
                 "--learning_rate=3e-3", f"--out_dir={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert "cls-pooled encoder (full)" in out and "accuracy" in out
    clf, tok, meta = load_model(tmp_path / "out")
    assert meta["classifier"]["labels"] == ["neg", "pos"] and meta["classifier"]["wrap"]
    ids = [tok.special_tokens["[CLS]"], *tok.encode("a good film"), tok.special_tokens["[SEP]"]]
    assert clf(torch.tensor([ids]))[0].argmax(-1).item() == 1
