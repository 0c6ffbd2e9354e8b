"""The tiny checkpoints' tokenizer: T5-like (Unigram + Metaspace, </s> appended) over a small fixed vocabulary, so
a checkpoint needs no download and unknown words still tokenize."""
from __future__ import annotations

import json
import math
import pathlib

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram


# T5's special tokens at T5's ids, so pad=0 / eos=1 / unk=2 mean the same thing as in t5-base.
_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
# SentencePiece's word-boundary marker, as in T5's tokenizer.
_SPACE = "\u2581"
_WORDS = tuple(
    """
    a an and the of with in for to on by from
    music song beat loop track melody rhythm bass drums drum guitar piano synth violin strings
    vocals choir flute horn pop rock jazz blues techno house ambient classical folk metal hip hop
    lofi disco funk reggae orchestral electronic happy sad calm dark bright slow fast heavy soft
    loud epic chill upbeat dreamy energetic acoustic groovy warm 80s 90s bpm solo intro
    """.split()
)
_CHARACTERS = tuple("abcdefghijklmnopqrstuvwxyz0123456789") + tuple(".,!?'\"-:;()&/+#%")
# Unigram log-probabilities: whole words beat spelling them out letter by letter.
_WORD_SCORE = -3.0
_MARKER_SCORE = -4.0
_CHAR_SCORE = -6.0
TOKENIZER_MAX_LENGTH = 512


def _tokenizer_vocab() -> list[tuple[str, float]]:
    vocab = [(token, 0.0) for token in _SPECIAL_TOKENS]
    vocab.append((_SPACE, _MARKER_SCORE))
    vocab += [(_SPACE + word, _WORD_SCORE) for word in _WORDS]
    vocab += [(char, _CHAR_SCORE) for char in _CHARACTERS]
    return vocab


def build_tokenizer() -> Tokenizer:
    """A T5-like Unigram tokenizer over a small fixed vocabulary.

    Unigram + Metaspace mirrors how T5's SentencePiece tokenizer splits text, so
    unknown words fall back to single characters and anything left (emoji,
    scripts outside the vocabulary) becomes ``<unk>`` rather than an error.
    """
    tokenizer = Tokenizer(Unigram(_tokenizer_vocab(), unk_id=_SPECIAL_TOKENS.index("<unk>")))
    # NFKD + StripAccents maps "é" to "e", so accented prompts keep their letters; whitespace
    # runs collapse and ends are stripped, as T5's SentencePiece normaliser does.
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always")
    # T5 appends </s> to every sequence; MusicGen's text encoder was trained that way.
    eos_id = _SPECIAL_TOKENS.index("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    tokenizer.add_special_tokens(list(_SPECIAL_TOKENS))
    return tokenizer


def _text_vocab_size() -> int:
    # Round up to a multiple of 8, as T5 itself pads its embedding table.
    return 8 * math.ceil(len(_tokenizer_vocab()) / 8)


def save_tokenizer(path: pathlib.Path) -> None:
    """Writes tokenizer.json plus the config files AutoTokenizer needs offline."""
    build_tokenizer().save(str(path / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    # PreTrainedTokenizerFast only wraps tokenizer.json, so no sentencepiece model file is needed.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        "padding_side": "right",
        **special,
    }
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "special_tokens_map.json", special)


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
