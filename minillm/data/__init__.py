"""Data: from text on disk to batches of token ids.

Read in this order:
    corpora.py          where text comes from: the embedded python-docs, tiny-shakespeare (downloaded
                        and checked by sha256), local .txt files; the one download helper
    tokenizer.py        the tokenizers' front door: `load_tokenizer`, and every tokenizer by name
    tokenizer_base.py   what all tokenizers share: special tokens, encoding a stream of text
    tokenizer_char.py   character-level (nanoGPT's shakespeare-char)
    tokenizer_bpe.py    byte-level BPE (GPT-2's), trained from scratch
    tokenizer_hf.py     a Hugging Face model's tokenizer.json, run by the `tokenizers` library
    tokenizer_gguf.py   a GGUF file's byte-level BPE (vocabulary, merges, pre-tokenizer), written out
    dataset.py          `load_text` (a corpus name or a path), the train/val split, token streams cached
                        as numpy memmaps, random batches, BERT's masked-LM corruption, IGNORE_INDEX
    pairs.py            [CLS] A [SEP] B [SEP] sentence pairs for BERT's next-sentence prediction
    translation.py      parallel text for the encoder–decoder: a generated date task, aligned files,
                        Multi30k (downloaded and checked by sha256), teacher-forcing batches
    tasks.py            labelled data for fine-tuning: classification (generated sentiment, SST-2, files)
                        and instruction records (generated tasks, LLMs-from-scratch's 1,100)
    chat_template.py    a model's own chat template: messages -> the exact text it was trained on
                        (its Jinja template, rendered in a bounded sandbox)
Nothing here imports the model: the label that losses skip (IGNORE_INDEX) is defined in dataset.py.
"""

from minillm.data.corpora import CORPORA
from minillm.data.dataset import (IGNORE_INDEX, MLM_SPECIAL_TOKENS, Dataset, get_batch, load_text, mask_tokens,
                                  prepare_dataset, split_text)
from minillm.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer, tokenizer_from_dict

__all__ = ["CORPORA", "IGNORE_INDEX", "MLM_SPECIAL_TOKENS", "BPETokenizer", "CharTokenizer", "Dataset", "get_batch",
           "load_text", "load_tokenizer", "mask_tokens", "prepare_dataset", "split_text", "tokenizer_from_dict"]
