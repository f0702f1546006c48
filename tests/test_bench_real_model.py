"""bench/real_model.py end to end at toy size, on a tiny llama GGUF written here (no pulled model).

The file is written the way tests/test_gguf.py writes its tiny llamas (GGUFWriter, llama.cpp's q/k
permutation), with SmolLM2's layout: a tied Q8_0 token embedding, Q4_1 linears, F32 norms, and a
byte-level vocabulary that llama.cpp accepts too (one merge, pre-tokenizer "smollm"). Every row,
part, goal and output file of the benchmark runs, so a typo anywhere in it fails here; the figures
themselves are not asserted (timing is a benchmark's business, not a test's), except where they
are properties: the GGUF-kept row computes with the file's own values, so its perplexity and
greedy tokens must equal those of the same file dequantized.
"""

from __future__ import annotations

import json

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import bench.real_model_rows as rows_module
from bench.real_model import main, parse_args
from bench.real_model_rows import KEYS, has_keep_quantized
from tests.test_gguf import write_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A 2-layer llama (C=64, GQA 4/2 heads, vocab 288) as Q8_0 embedding + Q4_1 linears."""
    mp = pytest.MonkeyPatch()
    W = gguf.GGUFWriter  # write_tiny_llama's vocabulary, made one llama.cpp loads: a merge and a known pre
    add_list, add_merges, add_pre = W.add_token_list, W.add_token_merges, W.add_tokenizer_pre
    mp.setattr(W, "add_token_list", lambda self, toks: add_list(self, [*toks[:256], "Ġt", *toks[257:]]))
    mp.setattr(W, "add_token_merges", lambda self, merges: add_merges(self, ["Ġ t"]))
    mp.setattr(W, "add_tokenizer_pre", lambda self, pre: add_pre(self, "smollm"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=288, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    try:
        # 2-D weights in order: token_embd, then 7 per layer; the cycle never comes back to Q8_0
        return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf, types=("Q8_0",) + ("Q4_1",) * 14)
    finally:
        mp.undo()


def run(argv, capsys) -> str:
    """main(argv) in this process; what it printed."""
    threads = torch.get_num_threads()
    try:
        main(argv)
    finally:
        torch.set_num_threads(threads)  # the script sets it for the whole process
    return capsys.readouterr().out


def test_every_row_and_part_runs_at_toy_size(tiny_gguf, tmp_path, capsys):
    out_file = tmp_path / "real.jsonl"
    out = run([f"--model={tiny_gguf}", "--quick", f"--out={out_file}"], capsys)
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"machine", "rss", "speed", "perplexity", "greedy", "answers", "goal", "table"} <= kinds
    assert out_file.with_suffix(".png").stat().st_size > 1000

    speed = [r for r in records if r["kind"] == "speed"]
    failed = [(r["row"], r["skipped"]) for r in speed if str(r.get("skipped", "")).startswith("FAILED")]
    assert not failed, f"a row that exists in this checkout could not generate: {failed}"
    expected = ["fp32", "bf16", "int8", "int4", "transformers"] + (["q4_1"] if has_keep_quantized() else [])
    for key in expected:  # batch 1 and 8, chat prompt and long prompt: a figure for each
        mine = [r for r in speed if r["row"] == key]
        assert len(mine) == 4 and all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in mine), key
    if rows_module._import_llama() is not None:
        mine = {r["scenario"]: r for r in speed if r["row"] == "llama.cpp"}
        assert mine["b1 p32"]["decode_tok_s"] > 0 and "one sequence at a time" in mine["b8 p32"]["skipped"]
    if not has_keep_quantized():
        assert any(r["row"] == "q4_1" and "keep_quantized" in r["skipped"] for r in speed)

    ppl = next(r for r in records if r["kind"] == "perplexity")["perplexity"]
    assert {"fp32", "bf16", "int8", "int4", "transformers"} <= set(ppl)
    assert ppl["transformers"] == pytest.approx(ppl["fp32"], rel=1e-5)  # the same dequantized weights
    goals = {g["goal"]: g for g in records if g["kind"] == "goal"}
    assert all(g["pass"] in (True, False) for name, g in goals.items() if g["measured"] is not None)
    if has_keep_quantized():  # the file's own values: the same function as its dequantized fp32, up to
        # the matmul's rounding (a kernel that quantizes activations per block, as llama.cpp does, adds some)
        assert goals["perplexity: q4_1 within 0.001 relative of fp32"]["pass"] is True
        kept = next(r for r in records if r["kind"] == "greedy" and r["row"] == "q4_1")
        for e in kept["per_prompt"]:  # where it parts from fp32, the gap there says whether that was a near-tie
            assert e["first_difference"] is None or e["near_tie"] == (e["fp32_top2_gap"] < 1e-3)
    greedy = next(r for r in records if r["kind"] == "greedy" and r["reference"] == "transformers")
    assert greedy["identical"] == greedy["prompts"] == 2

    table = next(r for r in records if r["kind"] == "table")["markdown"]
    assert table in out and "| runtime | decode tok/s b1 p15 |" in table and "| goal | measured | result |" in table
    assert next(r for r in records if r["kind"] == "machine")["cpu"] in table


def test_a_missing_library_is_a_skipped_row_with_its_reason(tiny_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rows_module, "_import_llama", lambda: None)
    out_file = tmp_path / "real.jsonl"
    out = run([f"--model={tiny_gguf}", "--quick", "--only=fp32,llama.cpp", "--parts=speed,perplexity",
                  f"--out={out_file}"], capsys)
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    llama = [r for r in records if r["kind"] == "speed" and r["row"] == "llama.cpp"]
    assert len(llama) == 1 and "pip install llama-cpp-python" in llama[0]["skipped"]
    assert "perplexity llama.cpp: skipped, llama-cpp-python not installed" in out
    decode = next(g for g in records if g["kind"] == "goal" and "llama.cpp >= 1.0" in g["goal"])
    assert decode["pass"] is None and decode["note"].startswith("unmeasured")
    assert {r["row"] for r in records if r["kind"] == "speed"} == {"fp32", "llama.cpp"}


def test_options_are_checked_at_start(capsys):
    assert parse_args(["--quick"]).new_tokens == 8 and parse_args([]).new_tokens == 128
    assert parse_args(["--quick", "--rounds=2"]).rounds == 2
    assert parse_args(["--only=int4,fp32"]).only == ["int4", "fp32"] and set(parse_args([]).only) == set(KEYS)
    for bad in (["--only=fp32,int3"], ["--parts=speed,vibes"], ["--threads=0"], ["--backend=bogus"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown int3" in err and "--backend=bogus: choose from" in err and "cpu-exact" in err
    with pytest.raises(SystemExit, match="--model=/nonexistent.gguf: no such file"):
        main(["--model=/nonexistent.gguf", "--quick"])  # one line, before any loading
