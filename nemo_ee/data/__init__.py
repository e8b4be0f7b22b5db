"""Data layer: stdlib source corpus, byte-level BPE tokenizer, next-token window datasets."""

from .corpus import CorpusSpec, corpus_fingerprint, iter_texts, list_corpus_files, split_files
from .dataset import TokenWindowDataset, build_datasets, token_dtype, tokenize_corpus
from .tokenizer import EOS_TOKEN, PAD_TOKEN, EETokenizer, train_tokenizer
from .hf_tokenizer import HFTokenizer, check_messages, load_tokenizer

__all__ = [
    "CorpusSpec",
    "EETokenizer",
    "EOS_TOKEN",
    "HFTokenizer",
    "PAD_TOKEN",
    "TokenWindowDataset",
    "build_datasets",
    "check_messages",
    "corpus_fingerprint",
    "iter_texts",
    "list_corpus_files",
    "load_tokenizer",
    "split_files",
    "token_dtype",
    "tokenize_corpus",
    "train_tokenizer",
]
