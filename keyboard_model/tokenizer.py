"""Word-level tokenizer: lower-cased words, punctuation split off, a fixed vocabulary.

It is trained on the public proxy split only. Phones receive it with the model and
never send anything back that it produced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from keyboard_model.errors import UserFacingError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

# A word keeps its inner apostrophes ("reliev'd", "o'er"); any other non-space
# character stands alone as punctuation.
_WORD_OR_PUNCTUATION = r"\w+(?:'\w+)*|[^\w\s]"
_IS_WORD = re.compile(r"\w")


def _new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    # Phones type the curly apostrophe; it must not split "don’t" differently from "don't".
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace("\u2019", "'"), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD_OR_PUNCTUATION), behavior="isolated")]
    )
    return tokenizer


class KeyboardTokenizer:
    """Turns text into token ids and back, and knows which tokens are suggestible words."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if vocab.get(token) != expected_id:
                raise ValueError(f"tokenizer must have {token!r} at id {expected_id}")
        self.token_to_id = vocab
        self.id_to_token = [""] * len(vocab)
        for token, token_id in vocab.items():
            self.id_to_token[token_id] = token
        # Special tokens and lone punctuation are never offered as suggestions.
        self.word_ids = [i for i, t in enumerate(self.id_to_token) if i >= len(SPECIAL_TOKENS) and _IS_WORD.search(t)]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 10_000) -> KeyboardTokenizer:
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens")
        tokenizer = _new_tokenizer()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: Path) -> KeyboardTokenizer:
        if not path.is_file():
            raise UserFacingError(f"tokenizer {path} does not exist; run `fedkb data` to prepare one")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (UserFacingError, UnicodeDecodeError) as error:
            raise UserFacingError(f"{path}: {error}") from error

    @classmethod
    def from_json(cls, text: str) -> KeyboardTokenizer:
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as error:  # the tokenizers library raises a bare Exception on bad JSON
            raise UserFacingError(f"not a tokenizer: {error}") from error
        return cls(tokenizer)

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    def save(self, path: Path) -> None:
        self._tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def split(self, text: str) -> list[str]:
        """Normalised word and punctuation pieces of `text`, before vocabulary lookup."""
        normalized = self._tokenizer.normalizer.normalize_str(text)
        return [piece for piece, _ in self._tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_message(self, text: str) -> list[int]:
        """A whole message as the model trains on it: <s> words </s>."""
        return [BOS_ID, *self.encode(text), EOS_ID]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[BOS_ID, *e.ids, EOS_ID] for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def ids_of(self, pieces: list[str]) -> list[int]:
        """Token ids of already split pieces (see `split`); unknown pieces are <unk>."""
        return [self.token_to_id.get(piece, UNK_ID) for piece in pieces]
