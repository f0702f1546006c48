"""Generation: from a trained causal LM to text.

Read in this order:
    core.py       the decode core every loop calls: prefill, decode_step (a flat fast branch
                  inside), extend (several tokens at once, for checking a speculative draft)
    cache.py      the verbs a decode cache speaks (append, length, rewind, reorder, per-row
                  positions), and the per-row cache of the batching engine
    sampling.py   choosing the next token (greedy, temperature, top-k, top-p) and the generate loop:
                  several prompts in one left-padded batch, past block_size, streaming text
    text.py       from new token ids to final text: stop strings, held-back UTF-8 and stop prefixes
    flat.py       a cached decode step without the module tree: the same ops, less Python per token
    native.py     the same step with the layer stack in one C call (compress/csrc/decode_cpu.c), for a
                  Llama-family model quantized on the CPU backend: no Python between the matmuls
    speculative.py  speculative decoding: a draft model or prompt lookup guesses k tokens, one `extend`
                  of the target checks them (the target's distribution, greedy's very tokens)
    beam.py       greedy and beam search (GNMT's or Hugging Face's length penalty) for the
                  encoder–decoder and the causal LM, stepped through the decode core
    batching.py   continuous batching: requests join and leave one shared batch between decode steps
                  (what the server runs)
    chat.py       a conversation with an instruct model: its chat template, the history kept within
                  the context window (what `minillm chat` runs)
"""

from minillm.generate.core import decode_step, extend, prefill
from minillm.generate.sampling import generate, generate_text, generate_tokens, probs, sample_next
from minillm.generate.speculative import speculative_generate, speculative_text

__all__ = ["decode_step", "extend", "generate", "generate_text", "generate_tokens", "prefill", "probs", "sample_next",
           "speculative_generate", "speculative_text"]
