"""The tiny zoo's character-level tokenizer.

Why characters: the skills are digit and letter manipulations, and one token per
character keeps the model tiny (a vocabulary of ~100) and makes every answer's
tokenisation unambiguous, so exact-match and log-likelihood scores measure the
skill rather than tokeniser quirks. It is an ordinary ``tokenizers`` pipeline
wrapped in ``PreTrainedTokenizerFast`` so ``AutoTokenizer`` and lm-eval load it.
"""
from __future__ import annotations

import string

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# Printable ASCII plus newline: everything a generated prompt or a user's text uses.
CHARACTERS = list(string.digits + string.ascii_lowercase + string.ascii_uppercase
                  + string.punctuation + " \n")


def char_tokenizer(model_max_length: int = 64):
    """A fresh character-level tokenizer; ids are stable (specials first, then CHARACTERS).

    No BOS/EOS is added when encoding: lm-eval and the trainer both encode bare text,
    and the model is trained on exactly what lm-eval will show it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # "[\s\S]" rather than "." so the newline is a token of its own too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
