"""Instruction tuning: a pre-trained causal LM learns to answer instructions (Alpaca; LLMs-from-scratch ch. 7).

Nothing about the model changes: no new head, the same next-token loss. What changes is the data and
which tokens the loss counts:

    record {"instruction", "input", "output"}
      → prompt = TEMPLATES[template] filled in          ("### Instruction: … ### Response:\n")
      → ids = prompt ids + response ids + end marker     (the tokenizer's <|endoftext|>, or the text "\n###")
      → x = ids[:-1], y = ids[1:];  y[t] = IGNORE_INDEX wherever ids[t+1] is a prompt token (or padding)
      → L = cross-entropy over the response and end tokens only: the model is not taught to write
        prompts, only to answer them, and to stop (the end marker is what generation stops at)
      → dev: the same masked loss, and greedy answers scored by exact match and ROUGE-L F1

Template "chat" uses the model's own chat template instead (an instruct model such as SmolLM2 was
tuned on it: the instruction becomes a user message, the response the assistant's turn, and the end
marker is the end-of-turn token the template closes turns with, <|im_end|> for ChatML). A model tuned
this way answers in `minillm chat` exactly as it was taught.

    >>> result = finetune_instruct(lm, tok, FinetuneConfig(task="instruct", data="alpaca-1100", lora_rank=8))
    >>> answer(result["model"], tok, "Give the opposite of \"hot\".")
"""

from __future__ import annotations

import torch

from minillm.data.chat_template import chat_prompt_for
from minillm.data.tasks import instruction_records, split_records
from minillm.evaluate.rouge import rouge_scores
from minillm.finetune.classify import pad_id
from minillm.finetune.config import FinetuneConfig
from minillm.finetune.trainer import check_out_dir, choose_trainable, fit, fresh_copy
from minillm.generate.sampling import generate_text
from minillm.model.losses import IGNORE_INDEX

ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n")
TEMPLATES = {
    # Alpaca's prompt (Taori et al. 2023), as LLMs-from-scratch uses it; "### Input:" only when there is input
    "alpaca": ALPACA_HEAD + "### Instruction:\n{instruction}\n\n{input}### Response:\n",
    # the same skeleton without the preamble, for small contexts (a char-level model's 128-256 tokens)
    "plain": "### Instruction:\n{instruction}\n{input}### Response:\n",
}
INPUT_SECTION = {"alpaca": "### Input:\n{input}\n\n", "plain": "{input}\n"}
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|end_of_text|>")  # GPT-2, Llama/Mistral, Qwen, Llama 3
END = "\n###"  # the end marker of a tokenizer without one: a char-level model can learn to write it


CHAT = "chat"  # the template name that means "the tokenizer's own chat template"


def format_prompt(record_or_instruction, input: str = "", template: str = "alpaca", tokenizer=None) -> str:
    """The prompt of a record (a dict with "instruction" and optional "input") or of an instruction.
    Template "chat" renders one user message in the tokenizer's chat template (the input, if any, on
    its own paragraph after the instruction), ending where the assistant's answer begins."""
    if template not in TEMPLATES and template != CHAT:
        raise ValueError(f"unknown instruction template {template!r}; choose one of "
                         f"{', '.join((*TEMPLATES, CHAT))}")
    if isinstance(record_or_instruction, dict):
        instruction, input = record_or_instruction["instruction"], record_or_instruction.get("input", "")
    else:
        instruction = record_or_instruction
    if template == CHAT:
        message = instruction + (f"\n\n{input}" if input else "")
        return _chat(tokenizer, [{"role": "user", "content": message}])[0]
    section = INPUT_SECTION[template].format(input=input) if input else ""
    return TEMPLATES[template].format(instruction=instruction, input=section)


def _chat(tokenizer, messages: list[dict]) -> tuple[str, list[str]]:
    rendered = chat_prompt_for(tokenizer, messages) if tokenizer is not None else None
    if rendered is None:
        raise ValueError("template 'chat' needs a tokenizer with a chat template (an instruct GGUF or Hugging "
                         "Face folder, e.g. smollm2-135m-instruct); use template=alpaca or plain otherwise")
    return rendered


def end_marker(tokenizer, template: str = "alpaca") -> str:
    """The text that ends a response: for template "chat", the end-of-turn token of the chat template;
    otherwise the tokenizer's end-of-text token if it has one, else END."""
    if template == CHAT:
        stops = _chat(tokenizer, [{"role": "user", "content": "hi"}])[1]
        if stops and stops[0] in tokenizer.special_tokens:
            return stops[0]
        raise ValueError("template 'chat' needs a tokenizer whose eos token closes the chat template's turns")
    return next((s for s in EOS_TOKENS if s in tokenizer.special_tokens), END)


def response_stop(tokenizer, template: str = "alpaca") -> list[str]:
    """Stop strings for generate_text: a special token decodes to its own text, so one list serves both."""
    return [end_marker(tokenizer, template)]


def _end_ids(tokenizer, template: str = "alpaca") -> list[int]:
    marker = end_marker(tokenizer, template)
    if marker in tokenizer.special_tokens:
        return [tokenizer.special_tokens[marker]]
    return tokenizer.encode(END, allowed_special="none")


def _encode(text: str, tokenizer, where: str) -> list[int]:
    """Ids of text taken literally (an "<|endoftext|>" typed in a record is text, not the end marker)."""
    try:
        return tokenizer.encode(text, allowed_special="none")
    except ValueError:  # a CharTokenizer meets a character it was not built with
        def encodes(c):
            try:
                return bool(tokenizer.encode(c, allowed_special="none"))
            except ValueError:
                return False
        ch = next((c for c in text if not encodes(c)), "?")
        raise ValueError(f"{where}: character {ch!r} (U+{ord(ch):04X}) is not in the {type(tokenizer).__name__}'s "
                         "vocabulary; instruction-tune a base model with a BPE/byte-level tokenizer") from None


def encode_example(record: dict, tokenizer, block_size: int, template: str = "alpaca",
                   where: str = "record") -> tuple[list[int], int, bool]:
    """(ids, n_prompt, cut): prompt ids + response ids + end marker, at most block_size + 1 of them
    (x = ids[:-1] then fits the context). A longer example is cut: the response keeps at least half the
    window (a long prompt cannot starve it of targets), the prompt keeps the rest from its end (the
    "### Response:" line the answer follows, as generation's crop to the last block_size tokens would
    see it), and the response loses its own end, so the end marker goes too."""
    prompt = _encode(format_prompt(record, template=template, tokenizer=tokenizer), tokenizer, where)
    response = _encode(record["output"], tokenizer, where) + _end_ids(tokenizer, template)
    room = block_size + 1
    if len(prompt) + len(response) <= room:
        return prompt + response, len(prompt), False
    keep = min(len(prompt), max(room - len(response), room // 2))  # prompt tokens kept
    return prompt[len(prompt) - keep:] + response[:room - keep], keep, True


def encode_records(records: list[dict], tokenizer, block_size: int, template: str,
                   name: str = "data") -> tuple[list[tuple[list[int], int]], int]:
    """[(ids, n_prompt)] per record, and how many were cut to fit block_size."""
    rows, cut = [], 0
    for i, r in enumerate(records, start=1):
        ids, n_prompt, was_cut = encode_example(r, tokenizer, block_size, template,
                                                where=f"{name} record {i} ({r['instruction'][:40]!r})")
        rows.append((ids, n_prompt))
        cut += was_cut
    return rows, cut


def make_batch(examples: list[tuple[list[int], int]], pad_id: int, device) -> dict:
    """{"idx": x (B, T), "targets": y (B, T)}, right-padded to the longest example.

    x[t] = ids[t], y[t] = ids[t+1]; y[t] is IGNORE_INDEX when ids[t+1] is a prompt token (t + 1 < n_prompt)
    or padding. Right padding needs no attention mask: causal attention never looks ahead, so a real
    position never sees the pads that follow it, and the pads' own outputs are ignored."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        y[i, :max(n_prompt - 1, 0)] = IGNORE_INDEX  # positions 0..n_prompt-2 predict prompt tokens 1..n_prompt-1
    return {"idx": x.to(device), "targets": y.to(device)}


@torch.no_grad()
def dev_loss(model, rows, pad: int, device, batch_size: int = 64) -> float:
    """The training loss over rows, weighted by response tokens (a batch mean is a per-token mean)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = make_batch(rows[i:i + batch_size], pad, device)
        n = int((batch["targets"] != IGNORE_INDEX).sum())
        total += model(**batch)[1].item() * n
        count += n
    model.train(was)
    return total / max(count, 1)


def answer(model, tokenizer, instruction: str, input: str = "", template: str = "alpaca", end=None,
           max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> str:
    """The model's response to one instruction: greedy by default, cut at the end marker."""
    stops = [end] if isinstance(end, str) else list(end or response_stop(tokenizer, template))
    [text] = generate_text(model, tokenizer, [format_prompt(instruction, input, template, tokenizer)], max_new_tokens,
                           temperature=temperature, top_k=top_k, generator=generator, stop=stops)
    return text


def evaluate(model, tokenizer, records: list[dict], rows, cfg: FinetuneConfig, device, batch_size: int = 32) -> dict:
    """Dev loss over every row; greedy answers to the first cfg.max_eval_examples records, scored by
    exact match (after strip) and ROUGE-L F1. Returns the scores and three (prompt, generated, reference)."""
    pad, block_size = pad_id(tokenizer), model.cfg.block_size
    records = records[:cfg.max_eval_examples]
    generated = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        # room for the longest reference and then some: an answer that runs on is scored as it is
        longest = max(len(_encode(r["output"], tokenizer, "dev")) for r in chunk)
        generated += generate_text(model, tokenizer,
                                   [format_prompt(r, template=cfg.template, tokenizer=tokenizer) for r in chunk],
                                   min(longest + 16, block_size), temperature=0.0,
                                   stop=response_stop(tokenizer, cfg.template))
    refs = [r["output"] for r in records]
    exact = sum(g.strip() == ref.strip() for g, ref in zip(generated, refs)) / len(refs)
    rouge = sum(rouge_scores(ref, g, types=("rougeL",))["rougeL"].fmeasure for g, ref in zip(generated, refs))
    samples = [{"prompt": format_prompt(r, template=cfg.template, tokenizer=tokenizer), "generated": g,
                "reference": r["output"]}
               for r, g in zip(records[:3], generated)]
    return {"val_loss": dev_loss(model, rows, pad, device), "val_exact_match": exact,
            "val_rougeL": rouge / len(refs), "samples": samples}


def finetune_instruct(lm, tokenizer, cfg: FinetuneConfig, *, base: str = "", device="cpu",
                      progress: bool = True, say=print) -> dict:
    """Instruction-tune `lm` (a loaded CausalLM) on cfg.data; returns the dev scores and run facts."""
    if cfg.task != "instruct":
        raise ValueError(f"finetune_instruct runs task=instruct, not {cfg.task}")
    if not getattr(getattr(lm, "cfg", None), "causal", False):
        raise ValueError(f"instruction tuning needs a causal LM (one that generates), not a {type(lm).__name__}")
    if cfg.freeze_trunk:
        raise ValueError("a linear probe has no new head for instruction tuning; use full or --lora_rank")
    source = cfg.data or "tasks"
    records = instruction_records(source, cache_dir=cfg.cache_dir, seed=cfg.seed)
    if cfg.dev_data:
        train, dev = records, instruction_records(cfg.dev_data, cache_dir=cfg.cache_dir, seed=cfg.seed + 1)
    else:
        train, dev = split_records(records, cfg.dev_fraction, cfg.seed, str(source))
    T = lm.cfg.block_size
    train_rows, train_cut = encode_records(train, tokenizer, T, cfg.template, "training")
    dev_rows, dev_cut = encode_records(dev, tokenizer, T, cfg.template, "dev")
    if train_cut or dev_cut:
        say(f"{train_cut:,} of {len(train_rows):,} training and {dev_cut:,} of {len(dev_rows):,} dev examples are "
            f"longer than block_size+1={T + 1} tokens and were cut (the response keeps at least half the window)")
    check_out_dir(cfg)
    model = (fresh_copy(lm, cfg.seed) if cfg.reinit else lm).to(device)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices
    counts = choose_trainable(model, cfg, head=[])  # no new head: LoRA trains nothing but its adapters
    end = end_marker(tokenizer, cfg.template)
    say(f"instruction tuning ({cfg.mode}, template {cfg.template!r}, end {end!r}): {counts['trainable']:,} of "
        f"{counts['total']:,} parameters train; {len(train_rows):,} train / {len(dev_rows):,} dev records of {source}")
    pad = pad_id(tokenizer)
    gen = torch.Generator().manual_seed(cfg.seed)
    last = {}

    def next_batch(step):
        pick = torch.randint(len(train_rows), (cfg.batch_size,), generator=gen).tolist()
        return make_batch([train_rows[i] for i in pick], pad, device)

    def run_eval():
        ev = evaluate(model, tokenizer, dev, dev_rows, cfg, device)
        last["samples"] = ev.pop("samples")  # kept out of metrics.jsonl
        return ev

    meta = {"base": base, "finetune": {**vars(cfg), "mode": cfg.mode}, "data": str(source),
            "instruct": {"template": cfg.template, "end": end}}
    result = fit(model, cfg, next_batch, run_eval, tokenizer=tokenizer, head=[], meta=meta, device=device,
                 progress=progress,
                 describe=lambda ev: f"step {ev['step']}: dev loss {ev['val_loss']:.4f}, exact match "
                                     f"{ev['val_exact_match']:.1%}, ROUGE-L {ev['val_rougeL']:.3f}")
    return {**result, "params": counts, "truncated": {"train": train_cut, "dev": dev_cut},
            "samples": last.get("samples", []), "n_train": len(train_rows), "n_dev": len(dev_rows),
            "model": model}
