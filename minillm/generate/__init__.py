"""Generation: from a trained causal LM to text.

Read in this order:
    sampling.py   choosing the next token (greedy, temperature, top-k, top-p), the KV-cache decode
                  loop, several prompts in one left-padded batch, streaming text
    flat.py       a cached decode step without the module tree: the same ops, less Python per token
    beam.py       greedy and beam search (GNMT length penalty) for the encoder–decoder and the causal LM
    batching.py   continuous batching: requests join and leave one shared batch between decode steps
                  (what the server runs)
"""

from minillm.generate.sampling import generate, generate_text, generate_tokens, sample_next

__all__ = ["generate", "generate_text", "generate_tokens", "sample_next"]
