"""Text for image-text methods: two small tokenizers and a small text transformer.

Nothing is downloaded: a tokenizer's vocabulary is built from a list of texts (or, for
:class:`CharTokenizer`, a fixed alphabet) and saved as plain JSON-able data
(``state_dict()`` / :func:`tokenizer_from_state`), so it can travel in a run directory
or a model card.

Every tokenizer maps a list of texts to a LongTensor (B, L) laid out as
``<bos> t1 ... tk <eos> <pad> ...`` (right padding; ids 0..3 are the special tokens
pad, unk, bos, eos). Texts also travel through datasets as UTF-8 bytes, one zero-padded
row per item (:func:`texts_to_utf8`, :func:`utf8_to_texts`), so that a dataset does not
depend on the tokenizer a method chooses; ``encode_utf8`` turns such rows into tokens
(for an ASCII :class:`CharTokenizer` with a lookup table, on the rows' device).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

#: the default CharTokenizer alphabet: lower-case ASCII letters, digits, space, punctuation
DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-()/&+#%*="

_WORD = re.compile(r"\w+|[^\w\s]")
STATE_VERSION = 1


# ------------------------------------------------------------------ texts as bytes

def _check_texts(texts: object, name: str = "texts") -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        got = type(texts).__name__ if not isinstance(texts, (list, tuple)) else \
            next(type(t).__name__ for t in texts if not isinstance(t, str))
        raise ValueError(f"{name}: expected a string or a list of strings, got {got}")
    return list(texts)


def texts_to_utf8(texts: Sequence[str], width: int | None = None) -> Tensor:
    """Texts as a uint8 (N, width) tensor of their UTF-8 bytes, zero-padded on the right.

    ``width`` None fits the longest text; a text longer than ``width`` bytes is an error
    (cut it first: a cut could split a character). NUL characters are not allowed.
    """
    texts = _check_texts(texts)
    encoded = [t.encode("utf-8") for t in texts]
    for i, b in enumerate(encoded):
        if b"\0" in b:
            raise ValueError(f"texts[{i}]: expected no NUL characters, got {texts[i]!r}")
    longest = max((len(b) for b in encoded), default=0)
    if width is None:
        width = max(longest, 1)
    elif longest > width:
        raise ValueError(f"width: expected at least {longest} (the longest text in bytes), "
                         f"got {width}")
    out = bytearray(len(encoded) * width)
    for i, b in enumerate(encoded):
        out[i * width:i * width + len(b)] = b
    return torch.frombuffer(out, dtype=torch.uint8).reshape(len(encoded), width).clone() \
        if encoded else torch.zeros(0, width, dtype=torch.uint8)


def utf8_to_texts(rows: Tensor) -> list[str]:
    """The inverse of :func:`texts_to_utf8`: a uint8 (N, W) tensor back to N strings."""
    if not isinstance(rows, Tensor) or rows.dtype != torch.uint8 or rows.ndim != 2:
        got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, Tensor) else \
            type(rows).__name__
        raise ValueError(f"rows: expected a uint8 (N, W) tensor of UTF-8 bytes, got {got}")
    data = rows.cpu().contiguous().numpy()
    return [bytes(r).rstrip(b"\0").decode("utf-8", errors="replace") for r in data]


# ------------------------------------------------------------------ tokenizers

class _Tokenizer:
    """What both tokenizers share: the id layout, padding, truncation, decoding."""

    kind = "base"
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, symbols: Sequence[str], *, lowercase: bool) -> None:
        self.lowercase = bool(lowercase)
        self.symbols: list[str] = list(SPECIALS) + list(symbols)
        self.index: dict[str, int] = {s: i for i, s in enumerate(self.symbols)}
        if len(self.index) != len(self.symbols):
            dup = [s for s, c in Counter(self.symbols).items() if c > 1]
            raise ValueError(f"vocabulary: expected distinct symbols, got repeats {dup[:5]}")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, the four special tokens included."""
        return len(self.symbols)

    def __len__(self) -> int:
        return self.vocab_size

    def _pieces(self, text: str) -> list[str]:
        raise NotImplementedError

    def _join(self, pieces: list[str]) -> str:
        raise NotImplementedError

    def ids(self, text: str) -> list[int]:
        """Token ids of one text, without <bos> / <eos>."""
        if self.lowercase:
            text = text.lower()
        get = self.index.get
        return [get(p, UNK_ID) for p in self._pieces(text)]

    def encode(self, texts: str | Sequence[str], max_len: int | None = None) -> Tensor:
        """Texts -> LongTensor (B, L): ``<bos> ids <eos>`` then ``<pad>`` up to L.

        Args:
            texts: a string or a list of strings.
            max_len: L, >= 2; longer texts are cut to L - 2 tokens (keeping <bos> and
                <eos>). None: the longest text's length + 2.
        """
        texts = _check_texts(texts)
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                    or max_len < 2):
            raise ValueError(f"max_len: expected an integer >= 2 (room for <bos> and <eos>), "
                             f"got {max_len!r}")
        rows = [self.ids(t) for t in texts]
        if max_len is None:
            max_len = max((len(r) for r in rows), default=0) + 2
        out = torch.full((len(rows), max_len), PAD_ID, dtype=torch.int64)
        for i, r in enumerate(rows):
            r = r[:max_len - 2]
            out[i, 0] = BOS_ID
            out[i, 1:len(r) + 1] = torch.tensor(r, dtype=torch.int64)
            out[i, len(r) + 1] = EOS_ID
        return out

    def encode_utf8(self, rows: Tensor, max_len: int | None = None) -> Tensor:
        """UTF-8 byte rows (see :func:`texts_to_utf8`) -> tokens, on the rows' device."""
        return self.encode(utf8_to_texts(rows), max_len).to(rows.device)

    def decode(self, tokens: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Token rows -> texts; <bos>, <eos> and <pad> are dropped (reading stops at
        <eos>), an unknown id reads as ``<unk>``."""
        if isinstance(tokens, Tensor):
            if tokens.ndim == 1:
                tokens = tokens[None]
            if tokens.ndim != 2 or tokens.is_floating_point():
                raise ValueError(f"tokens: expected an integer (B, L) tensor, got "
                                 f"{tokens.dtype} {tuple(tokens.shape)}")
            tokens = tokens.tolist()
        out = []
        for row in tokens:
            pieces = []
            for t in row:
                t = int(t)
                if t == EOS_ID:
                    break
                if t in (PAD_ID, BOS_ID):
                    continue
                pieces.append(self.symbols[t] if 0 <= t < len(self.symbols) else UNK)
            out.append(self._join(pieces))
        return out

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Plain data for a card: kind, vocabulary size and the state that rebuilds it."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "state": self.state_dict()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Tokenizer) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


class CharTokenizer(_Tokenizer):
    """One token per character (the alphabet fixed up front, or built from texts).

    Open vocabulary for any prompt over the alphabet: nothing to learn about words, which
    the text encoder has to assemble from characters. Characters outside the alphabet
    read as ``<unk>``.

    Args:
        alphabet: the characters, in id order (ids start at 4); None is
            :data:`DEFAULT_ALPHABET`.
        lowercase: lower-case texts before looking characters up.
    """

    kind = "char"

    def __init__(self, alphabet: str | Iterable[str] | None = None, *,
                 lowercase: bool = True) -> None:
        chars = list(DEFAULT_ALPHABET if alphabet is None else alphabet)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("alphabet: expected a non-empty string of single characters")
        super().__init__(chars, lowercase=lowercase)
        self.alphabet = "".join(chars)
        self._table: Tensor | None = None

    @classmethod
    def from_texts(cls, texts: Sequence[str], *, lowercase: bool = True) -> CharTokenizer:
        """The sorted set of characters that occur in ``texts`` (after lower-casing)."""
        texts = _check_texts(texts)
        chars = {c for t in texts for c in (t.lower() if lowercase else t)}
        if not chars:
            raise ValueError("texts: expected at least one character")
        return cls("".join(sorted(chars)), lowercase=lowercase)

    def _pieces(self, text: str) -> list[str]:
        return list(text)

    def _join(self, pieces: list[str]) -> str:
        return "".join(pieces)

    def _byte_table(self) -> Tensor | None:
        """byte -> id for an all-ASCII alphabet (None otherwise); 0 (NUL) maps to <pad>."""
        if self._table is None and all(ord(c) < 128 for c in self.alphabet):
            table = torch.full((256,), UNK_ID, dtype=torch.int64)
            for c in map(chr, range(1, 128)):
                key = c.lower() if self.lowercase else c
                table[ord(c)] = self.index.get(key, UNK_ID)
            table[0] = PAD_ID
            self._table = table
        return self._table

    def encode_utf8(self, rows: Tensor, max_len: int | None = None) -> Tensor:
        """UTF-8 byte rows -> tokens with tensor ops on the rows' device (no Python loop
        over texts) when the alphabet is ASCII and the rows are ASCII; else as
        :meth:`encode`."""
        table = self._byte_table()
        if not isinstance(rows, Tensor) or rows.dtype != torch.uint8 or rows.ndim != 2:
            return super().encode_utf8(rows, max_len)
        if table is None or bool((rows >= 128).any()):
            return super().encode_utf8(rows, max_len)
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                    or max_len < 2):
            raise ValueError(f"max_len: expected an integer >= 2 (room for <bos> and <eos>), "
                             f"got {max_len!r}")
        n, width = rows.shape
        lengths = (rows != 0).sum(1)
        if max_len is None:
            max_len = int(lengths.max()) + 2 if n else 2
        ids = table.to(rows.device)[rows.long()]                 # (N, W), pads stay 0
        content = min(width, max_len - 2)
        out = torch.zeros(n, max_len, dtype=torch.int64, device=rows.device)
        out[:, 0] = BOS_ID
        out[:, 1:content + 1] = ids[:, :content]
        end = lengths.clamp(max=max_len - 2) + 1                 # position of <eos>
        out[torch.arange(n, device=rows.device), end] = EOS_ID
        # bytes cut off by max_len would have left non-pad ids after <eos>: clear them
        cols = torch.arange(max_len, device=rows.device)
        return out.masked_fill(cols[None, :] > end[:, None], PAD_ID)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": STATE_VERSION, "alphabet": self.alphabet,
                "lowercase": self.lowercase}


class WordTokenizer(_Tokenizer):
    """One token per word or punctuation mark, over a vocabulary built from texts.

    Texts are split into runs of word characters and single punctuation marks
    (``"a red, round"`` -> ``a | red | , | round``); words outside the vocabulary read as
    ``<unk>``. Decoding joins tokens with single spaces.

    Args:
        words: the vocabulary in id order (ids start at 4).
        lowercase: lower-case texts before splitting.
    """

    kind = "word"

    def __init__(self, words: Iterable[str], *, lowercase: bool = True) -> None:
        words = list(words)
        if not words or any(not isinstance(w, str) or not w or w in SPECIALS for w in words):
            raise ValueError("words: expected a non-empty list of non-empty strings other than "
                             f"the special tokens {', '.join(SPECIALS)}")
        super().__init__(words, lowercase=lowercase)
        self.words = words

    @classmethod
    def from_texts(cls, texts: Sequence[str], *, min_count: int = 1,
                   max_size: int | None = None, lowercase: bool = True) -> WordTokenizer:
        """Vocabulary of the words seen at least ``min_count`` times, most frequent first
        (ties in alphabetical order), at most ``max_size`` words; deterministic."""
        texts = _check_texts(texts)
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count: expected an integer >= 1, got {min_count!r}")
        counts = Counter(p for t in texts for p in _WORD.findall(t.lower() if lowercase else t))
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max_size]
        if not words:
            raise ValueError(f"texts: no word occurs at least {min_count} time(s)")
        return cls(words, lowercase=lowercase)

    def _pieces(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def _join(self, pieces: list[str]) -> str:
        return " ".join(pieces)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": STATE_VERSION, "words": list(self.words),
                "lowercase": self.lowercase}


_CODE_PIECE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+|[^\w\s]")


class CodeTokenizer(WordTokenizer):
    """A :class:`WordTokenizer` for source code and its documentation: identifiers are split
    into their parts (``get_source_segment`` -> get | source | segment, ``HTTPServer`` ->
    http | server), so that the words of a docstring meet the names in code; underscores
    are dropped, other punctuation is one token per mark. Case is used for splitting and
    then dropped (``lowercase``).
    """

    kind = "code"

    @classmethod
    def from_texts(cls, texts: Sequence[str], *, min_count: int = 1,
                   max_size: int | None = None, lowercase: bool = True) -> CodeTokenizer:
        """Vocabulary of the pieces seen at least ``min_count`` times, most frequent first
        (ties in alphabetical order), at most ``max_size``; deterministic."""
        texts = _check_texts(texts)
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count: expected an integer >= 1, got {min_count!r}")
        counts = Counter(p.lower() if lowercase else p
                         for t in texts for p in _CODE_PIECE.findall(t))
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max_size]
        if not words:
            raise ValueError(f"texts: no piece occurs at least {min_count} time(s)")
        return cls(words, lowercase=lowercase)

    def _pieces(self, text: str) -> list[str]:
        return _CODE_PIECE.findall(text)

    def ids(self, text: str) -> list[int]:
        get = self.index.get
        pieces = self._pieces(text)
        if self.lowercase:
            pieces = [p.lower() for p in pieces]
        return [get(p, UNK_ID) for p in pieces]


Tokenizer = CharTokenizer | WordTokenizer
TOKENIZERS: dict[str, type[_Tokenizer]] = {"char": CharTokenizer, "word": WordTokenizer,
                                           "code": CodeTokenizer}


def tokenizer_from_state(state: Mapping[str, Any]) -> CharTokenizer | WordTokenizer:
    """Rebuild a tokenizer from its ``state_dict()`` (e.g. read back from JSON)."""
    if not isinstance(state, Mapping) or state.get("kind") not in TOKENIZERS:
        kind = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"tokenizer state: expected kind 'char', 'word' or 'code', got "
                         f"{kind!r}")
    if state.get("version", STATE_VERSION) != STATE_VERSION:
        raise ValueError(f"tokenizer state: version {state.get('version')!r} is not supported "
                         f"(expected {STATE_VERSION})")
    lowercase = bool(state.get("lowercase", True))
    if state["kind"] == "char":
        return CharTokenizer(state.get("alphabet"), lowercase=lowercase)
    cls = CodeTokenizer if state["kind"] == "code" else WordTokenizer
    return cls(state.get("words") or [], lowercase=lowercase)


def build_tokenizer(spec: Any = "char", *, vocabulary: Sequence[str] | None = None
                    ) -> CharTokenizer | WordTokenizer:
    """A tokenizer from a tokenizer, its state dict, or a kind name.

    ``"char"`` uses ``vocabulary`` as the alphabet (a string or list of characters;
    None: :data:`DEFAULT_ALPHABET`); ``"word"`` needs ``vocabulary``, the list of words.
    """
    if isinstance(spec, _Tokenizer):
        if vocabulary is not None:
            raise ValueError("vocabulary: only used with a tokenizer kind name, got a tokenizer")
        return spec  # type: ignore[return-value]
    if isinstance(spec, Mapping):
        return tokenizer_from_state(spec)
    if spec == "char":
        return CharTokenizer(None if vocabulary is None else vocabulary)
    if spec in ("word", "code"):
        if not vocabulary:
            raise ValueError("vocabulary: a word tokenizer needs its list of words (or build "
                             "one with WordTokenizer.from_texts(captions))")
        if isinstance(vocabulary, str):
            vocabulary = vocabulary.split()
        return (CodeTokenizer if spec == "code" else WordTokenizer)(vocabulary)
    raise ValueError(f"tokenizer: expected 'char', 'word', 'code', a tokenizer or its state dict, "
                     f"got {spec!r}")


def trim_padding(tokens: Tensor, pad_id: int = PAD_ID) -> Tensor:
    """(B, L) right-padded token rows without the columns that are padding in every row
    (attention cost grows with L); at least one column is kept."""
    longest = int((tokens != pad_id).sum(1).max()) if tokens.numel() else 1
    return tokens[:, :max(longest, 1)]


# ------------------------------------------------------------------ text encoder

class TextTransformer(nn.Module):
    """Token and learned positional embeddings, a stack of pre-norm Transformer encoder
    layers (Vaswani et al., 2017) with a key padding mask, a final LayerNorm and one vector
    per text: the hidden state at <eos> (CLIP's choice, Radford et al., 2021) or the mean
    over the non-pad positions.

    Args:
        vocab_size: number of token ids (``tokenizer.vocab_size``).
        context_length: longest token row accepted (<bos> and <eos> included).
        width: model width; ``heads`` must divide it.
        layers, heads, mlp_ratio, dropout: the encoder layers.
        pooling: ``"eos"`` (the last non-pad position, <eos> for rows made by a nearfar
            tokenizer) or ``"mean"``.
        out_dim: None keeps ``width``; otherwise a final linear map to ``out_dim``.
        pad_id: the padding id (masked out of attention and pooling).
    """

    def __init__(self, vocab_size: int, *, context_length: int = 64, width: int = 128,
                 layers: int = 2, heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 pooling: str = "eos", out_dim: int | None = None, pad_id: int = PAD_ID) -> None:
        super().__init__()
        for name, v, low in (("vocab_size", vocab_size, len(SPECIALS) + 1),
                             ("context_length", context_length, 2), ("width", width, 1),
                             ("layers", layers, 1), ("heads", heads, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
        if width % heads:
            raise ValueError(f"heads: expected a divisor of width={width}, got {heads}")
        if pooling not in ("eos", "mean"):
            raise ValueError(f"pooling: expected 'eos' or 'mean', got {pooling!r}")
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.pooling, self.pad_id = pooling, int(pad_id)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=int(width * mlp_ratio),
                                       dropout=dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out_dim = int(out_dim) if out_dim is not None else width
        self.proj = nn.Linear(width, self.out_dim, bias=False) if out_dim is not None else None
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def check_tokens(self, tokens: object) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point() \
                or tokens.dtype == torch.bool:
            got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else \
                type(tokens).__name__
            raise ValueError(f"tokens: expected an integer (B, L) tensor of token ids, got {got}")
        b, n = tokens.shape
        if n > self.context_length or n < 1:
            raise ValueError(f"tokens: expected at most context_length={self.context_length} "
                             f"positions, got shape ({b}, {n}); encode with max_len <= "
                             f"{self.context_length}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens: expected ids in [0, {self.vocab_size}) (this encoder's "
                             f"vocabulary), got values in [{int(tokens.min())}, "
                             f"{int(tokens.max())}]; was it made with another tokenizer?")
        if b and bool((tokens == self.pad_id).all(1).any()):
            raise ValueError("tokens: expected at least one non-pad token in every row, got a "
                             "row of padding only")
        return tokens.long()

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, out_dim)."""
        tokens = self.check_tokens(tokens)
        pad = tokens == self.pad_id
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        x = self.norm(x)
        keep = (~pad).to(x.dtype)
        if self.pooling == "eos":
            # last non-pad position (right padding): <eos> for rows made by our tokenizers
            last = (keep.cumsum(1) * keep).argmax(1)
            h = x[torch.arange(len(x), device=x.device), last]
        else:
            h = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        return self.proj(h) if self.proj is not None else h


__all__ = [
    "BOS", "DEFAULT_ALPHABET", "EOS", "PAD", "SPECIALS", "UNK", "CharTokenizer", "CodeTokenizer",
    "TextTransformer", "Tokenizer", "WordTokenizer", "build_tokenizer", "texts_to_utf8",
    "trim_padding",
    "tokenizer_from_state", "utf8_to_texts",
]
