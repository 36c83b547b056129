"""Tokenizers (round trips, padding, truncation, saved state) and the text transformer."""

import json

import pytest
import torch

from nearfar.nn.text import (
    BOS,
    EOS,
    CharTokenizer,
    TextTransformer,
    WordTokenizer,
    build_tokenizer,
    texts_to_utf8,
    tokenizer_from_state,
    utf8_to_texts,
)

TEXTS = ["a small red circle in the top left", "in the center there is a large blue square",
         "a green cross, small, at the bottom", "hi"]


@pytest.mark.parametrize("make", [lambda: CharTokenizer(), lambda: CharTokenizer.from_texts(TEXTS),
                                  lambda: WordTokenizer.from_texts(TEXTS)])
def test_round_trip_padding_and_layout(make):
    tok = make()
    ids = tok.encode(TEXTS, max_len=64)
    assert ids.dtype == torch.int64 and ids.shape == (4, 64)
    assert tok.decode(ids) == [" ".join(t.replace(",", " ,").split()) if tok.kind == "word"
                               else t for t in TEXTS]
    lengths = [len(tok.ids(t)) for t in TEXTS]
    for row, n in zip(ids.tolist(), lengths):
        assert row[0] == tok.bos_id and row[n + 1] == tok.eos_id
        assert all(t == tok.pad_id for t in row[n + 2:])
        assert tok.pad_id not in row[:n + 2]
    # max_len None fits the longest text exactly
    assert tok.encode(TEXTS).shape == (4, max(lengths) + 2)


def test_truncation_keeps_bos_and_eos():
    tok = CharTokenizer()
    ids = tok.encode(["abcdefgh", "ab"], max_len=5)
    assert ids.tolist() == [[2, *tok.ids("abc"), 3], [2, *tok.ids("ab"), 3, 0]]
    assert tok.decode(ids) == ["abc", "ab"]
    with pytest.raises(ValueError, match="max_len: expected an integer >= 2"):
        tok.encode(["a"], max_len=1)


def test_unknowns_lowercase_and_specials():
    words = WordTokenizer.from_texts(["a red circle", "a blue square"])
    assert words.decode(words.encode("A RED triangle!")) == ["a red <unk> <unk>"]
    chars = CharTokenizer("abc")
    assert chars.decode(chars.encode(["Abz"])) == ["ab<unk>"]
    assert CharTokenizer("abc", lowercase=False).decode(
        CharTokenizer("abc", lowercase=False).encode(["Ab"])) == ["<unk>b"]
    assert chars.symbols[:4] == ["<pad>", "<unk>", BOS, EOS]
    with pytest.raises(ValueError, match="texts: expected a string or a list of strings"):
        chars.encode([1, 2])


def test_word_vocabulary_is_deterministic_by_frequency():
    tok = WordTokenizer.from_texts(["b a", "a c", "a b"])
    assert tok.words == ["a", "b", "c"]                  # a: 3, b: 2, c: 1
    assert WordTokenizer.from_texts(["b a", "a c", "a b"], min_count=2).words == ["a", "b"]
    assert WordTokenizer.from_texts(["b a", "a c", "a b"], max_size=1).words == ["a"]


@pytest.mark.parametrize("tok", [CharTokenizer(), WordTokenizer.from_texts(TEXTS)])
def test_state_is_plain_json_and_rebuilds_the_same_tokenizer(tok):
    state = json.loads(json.dumps(tok.state_dict()))
    again = tokenizer_from_state(state)
    assert again == tok and type(again) is type(tok)
    assert torch.equal(again.encode(TEXTS, 48), tok.encode(TEXTS, 48))
    assert build_tokenizer(state) == tok
    with pytest.raises(ValueError, match="kind 'char', 'word' or 'code'"):
        tokenizer_from_state({"kind": "bpe"})


def test_build_tokenizer_specs():
    assert build_tokenizer("char") == CharTokenizer()
    assert build_tokenizer("word", vocabulary="a red circle").words == ["a", "red", "circle"]
    with pytest.raises(ValueError, match="needs its list of words"):
        build_tokenizer("word")
    with pytest.raises(ValueError, match="expected 'char', 'word'"):
        build_tokenizer("bpe")


def test_utf8_rows_round_trip_and_tokenize_like_texts():
    texts = ["a red circle", "", "héllo wörld", "x"]
    rows = texts_to_utf8(texts)
    assert rows.dtype == torch.uint8 and rows.shape == (4, len("héllo wörld".encode()))
    assert utf8_to_texts(rows) == texts
    assert texts_to_utf8(["ab"], width=4).tolist() == [[97, 98, 0, 0]]
    with pytest.raises(ValueError, match="width: expected at least 3"):
        texts_to_utf8(["abc"], width=2)
    ascii_texts = [t for t in TEXTS] + ["", "Upper CASE ~"]
    rows = texts_to_utf8(ascii_texts)
    for tok in (CharTokenizer(), CharTokenizer.from_texts(TEXTS), WordTokenizer.from_texts(TEXTS)):
        for max_len in (None, 8, 40, 64):
            assert torch.equal(tok.encode_utf8(rows, max_len), tok.encode(ascii_texts, max_len))
    # non-ASCII rows take the decoding path and still agree
    tok = CharTokenizer.from_texts(texts)
    assert torch.equal(tok.encode_utf8(texts_to_utf8(texts), 16), tok.encode(texts, 16))


@pytest.mark.parametrize("pooling", ["eos", "mean"])
def test_text_transformer_ignores_padding(pooling):
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = TextTransformer(tok.vocab_size, context_length=48, width=32, layers=2, heads=4,
                            pooling=pooling, out_dim=16).eval()
    short, long_ = tok.encode(TEXTS), tok.encode(TEXTS, 48)     # 44 and 48 positions
    with torch.no_grad():
        a, b = model(short), model(long_)
    assert a.shape == (4, 16) and model.out_dim == 16
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)   # more padding, same output
    with torch.no_grad():
        alone = model(tok.encode(TEXTS[3:], 12))
    torch.testing.assert_close(alone, a[3:], atol=1e-5, rtol=1e-5)
    model.train()
    model(short).sum().backward()
    assert model.token_embedding.weight.grad is not None


def test_text_transformer_errors_name_the_problem():
    model = TextTransformer(10, context_length=8, width=16, heads=2)
    with pytest.raises(ValueError, match="at most context_length=8"):
        model(torch.full((1, 9), 4))
    with pytest.raises(ValueError, match=r"ids in \[0, 10\)"):
        model(torch.tensor([[2, 11, 3]]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="padding only"):
        model(torch.tensor([[2, 5, 3], [0, 0, 0]]))
    with pytest.raises(ValueError, match="heads: expected a divisor"):
        TextTransformer(10, width=10, heads=4)
