"""Data: from text on disk to batches of token ids.

Read in this order:
    corpora.py     where text comes from: the embedded python-docs, tiny-shakespeare (downloaded and
                   checked by sha256), local .txt files
    tokenizer.py   character-level and byte-level BPE tokenizers
    dataset.py     the train/val split, token streams cached as numpy memmaps, random batches, and
                   BERT's masked-LM corruption
    pairs.py       [CLS] A [SEP] B [SEP] sentence pairs for BERT's next-sentence prediction
    translation.py parallel text for the encoder–decoder: a generated date task, aligned files,
                   Multi30k (downloaded and checked by sha256), teacher-forcing batches
    tasks.py       labelled data for fine-tuning: classification (generated sentiment, SST-2, files)
                   and instruction records (generated tasks, LLMs-from-scratch's 1,100)
"""

from minillm.data.corpora import CORPORA, load_text
from minillm.data.dataset import (MLM_SPECIAL_TOKENS, Dataset, get_batch, mask_tokens, prepare_dataset,
                                  split_text)
from minillm.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer, tokenizer_from_dict

__all__ = ["CORPORA", "MLM_SPECIAL_TOKENS", "BPETokenizer", "CharTokenizer", "Dataset", "get_batch",
           "load_text", "load_tokenizer", "mask_tokens", "prepare_dataset", "split_text",
           "tokenizer_from_dict"]
