"""Quality for bench/real_model.py: perplexity of every variant, and where greedy decoding parts ways.

Perplexity is exp(mean −log p(token)) over the python-docs validation split (minillm's split_text),
in non-overlapping windows each scored from its own start. Every variant scores the same token ids,
so the figures compare directly with the fp32 row (the GGUF dequantized): the quantized rows must
stay within the issue's margins of it.

Greedy equality: 64 greedy tokens after each prompt, a variant's against fp32's. Two models that
compute the same function up to rounding pick the same token unless the top two logits are closer
than that rounding, so where the Q4_1-kept row (the same weight values as fp32) parts from fp32,
the top-2 gap of fp32's logits at that position is measured: a gap < 1e-3 is a near-tie, reported
as such, and anything else is a real difference. For minillm's own int8/int4 (other weights) the
first diverging position per prompt is the figure.
"""

from __future__ import annotations

import math

import torch

NEAR_TIE = 1e-3  # top-2 logit gap under which fp32 rounding may pick either token


def eval_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first n_tokens of the python-docs validation split, in this tokenizer."""
    from minillm.data.dataset import load_text, split_text

    _, val = split_text(load_text("python-docs"))
    ids = tokenizer.encode(val, allowed_special="none")
    return ids[:n_tokens]


def nll_windows(logits_fn, ids: list[int], window: int) -> tuple[float, int]:
    """Sum of -log p(token) over non-overlapping windows (each scored from its own start) and how
    many tokens were scored: the first token of each window has no context and is not scored."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        with torch.inference_mode():
            logits = logits_fn(chunk).double()  # (T, V)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        target = torch.tensor(chunk[1:])
        total -= logp.gather(1, target[:, None]).sum().item()
        count += len(chunk) - 1
    return total, count


def perplexities(logit_fns: dict, ids: list[int], window: int, log=print) -> dict:
    """{key: perplexity} for every (key, ids -> (T, V) logits) in logit_fns, and the tokens scored."""
    out = {}
    for key, fn in logit_fns.items():
        nll, n = nll_windows(fn, ids, window)
        out[key] = math.exp(nll / n)
        log(f"perplexity {key:>12}: {out[key]:.5f} over {n} tokens")
    return {"kind": "perplexity", "window": window, "tokens_scored": n, "perplexity": out}


def greedy(model, prompt: list[int], n_new: int) -> list[int]:
    from minillm.generate.sampling import generate

    idx = torch.tensor([prompt])  # (1, T)
    return generate(model, idx, n_new, temperature=0.0, flat_decode=True)[0, len(prompt):].tolist()


@torch.inference_mode()
def top2_gap(model, context: list[int]) -> float:
    """logit(top 1) - logit(top 2) for the token after `context`, from a full forward pass."""
    logits = model(torch.tensor([context]))[0][0, -1].float()  # (V,)
    top = torch.topk(logits, 2).values
    return (top[0] - top[1]).item()


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def greedy_against_fp32(rows: dict, prompts: list[list[int]], n_new: int, log=print) -> list[dict]:
    """For each non-fp32 minillm row: per prompt, the first position where its greedy tokens part
    from fp32's (None: equal), with fp32's top-2 gap there and whether that is a near-tie."""
    ref = rows["fp32"].model
    want = [greedy(ref, p, n_new) for p in prompts]
    records = []
    for key, row in rows.items():
        if key == "fp32" or row.model is None:
            continue
        per_prompt = []
        for p, w in zip(prompts, want):
            got = greedy(row.model, p, n_new)
            i = first_difference(got, w)
            entry = {"first_difference": i}
            if i is not None:
                gap = top2_gap(ref, p + w[:i])
                entry.update(fp32_top2_gap=gap, near_tie=gap < NEAR_TIE)
            per_prompt.append(entry)
        equal = sum(e["first_difference"] is None for e in per_prompt)
        ties = sum(bool(e.get("near_tie")) for e in per_prompt)
        log(f"greedy {key:>5} vs fp32: {equal}/{len(prompts)} equal for {n_new} tokens, {ties} near-tie divergences; "
            f"first differences {[e['first_difference'] for e in per_prompt]}")
        records.append({"kind": "greedy", "row": key, "reference": "fp32", "new_tokens": n_new,
                        "prompts": len(prompts), "identical": equal, "near_ties": ties, "per_prompt": per_prompt})
    return records


def greedy_against_transformers(model, hf, prompts: list[list[int]], n_new: int, log=print) -> dict:
    """minillm fp32's greedy tokens against transformers' generate on the same GGUF."""
    same, firsts = 0, []
    for p in prompts:
        ours = greedy(model, p, n_new)
        with torch.inference_mode():  # eos_token_id=None: both run all n_new steps, through an EOS too
            # (min_new_tokens would instead forbid the EOS, and the two would part there)
            theirs = hf.generate(torch.tensor([p]), max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].tolist()
        same += ours == theirs
        firsts.append(first_difference(ours, theirs))
    log(f"greedy fp32 vs transformers: {same}/{len(prompts)} identical, first differences {firsts}")
    return {"kind": "greedy", "row": "fp32", "reference": "transformers", "new_tokens": n_new, "prompts": len(prompts),
            "identical": same, "first_difference": firsts}
