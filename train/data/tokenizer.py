"""Tokenizers: a sentencepiece model trained on the embedded default, or a base model's own.

The trained model is exposed as a `transformers` fast tokenizer (saved with `save_pretrained`,
loaded with `AutoTokenizer.from_pretrained`) so every stage loads tokenizers one way.
Nothing is ever fetched from a hub: loading is `local_files_only`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512):
    """Train a BPE sentencepiece model (digits split, byte fallback) and save it as a HF tokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(t.replace("\r", " ") + "\n")
        src = Path(tmp) / "src"
        src.mkdir()
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(src / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, character_coverage=1.0, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            num_threads=1, minloglevel=2,  # one thread: the same corpus gives the same model
        )
        tok = LlamaTokenizer.from_pretrained(str(src), local_files_only=True)
    tok.pad_token = PAD
    tok.save_pretrained(str(out))
    return tok


def tokenizer_from_sentencepiece(model_file: str | Path, out_dir: str | Path):
    """A raw sentencepiece `tokenizer.model` (e.g. LLaMA's or Mistral's 32k BPE) saved as a Hugging Face Llama
    tokenizer dir that every stage can load."""
    import shutil

    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, local_files_only=True)
    tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a tokenizer from a local directory; make sure it has a pad token (EOS if none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
