"""A tokenizer's vocabulary as text, computed once: what lets the batch find decision points from token ids.

`TokenTable.of(tokenizer)` decodes every token id once (each id's piece as it reads after ordinary text, so a
leading space is kept) and keeps the result on the tokenizer object. From it the batch derives, per cue
configuration, which ids can start or complete a decision point (`CueDetector.candidates`) and, per lexicon,
which ids are path deviation's transition words (`PathDeviation.transition_table`). At every step the batch
then looks its token ids up in those boolean tables (one numpy gather) and runs the text rules only on the few
rows that need them. Decoding a whole 152k vocabulary takes about a second with a fast tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

_ATTR = "_overthink_token_table"


class TokenTable:
    """Each token id's text piece, and tables derived from it (cached per key).

    Example:
        >>> t = TokenTable([" so", ".\\n\\n", " Wait"])
        >>> t.lookup("newline", lambda texts: np.array(["\\n" in x for x in texts]), np.array([0, 1, 5]))
        array([False,  True,  True])
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self._derived: dict[Hashable, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def text(self, token_id: int) -> str:
        """The text of `token_id` ("" for an id past the table)."""
        return self.texts[token_id] if 0 <= token_id < len(self.texts) else ""

    @classmethod
    def of(cls, tokenizer: Any) -> TokenTable:
        """The table of `tokenizer` (built on first use, then kept on the tokenizer object)."""
        table = getattr(tokenizer, _ATTR, None)
        if isinstance(table, TokenTable):
            return table
        table = cls(_piece_texts(tokenizer))
        try:
            setattr(tokenizer, _ATTR, table)
        except AttributeError:  # a tokenizer that takes no attributes: rebuilt per call (correct, slower)
            pass
        return table

    def derived(self, key: Hashable, make: Callable[[list[str]], np.ndarray], beyond: bool = True) -> np.ndarray:
        """The per-id boolean array `make(texts)` (computed once per key), with one more entry, `beyond`, for
        the ids past the table (a model whose output layer is wider than its tokenizer): True for a gate (their
        text is unknown, so they are always checked), False for a word list."""
        arr = self._derived.get(key)
        if arr is None:
            arr = self._derived[key] = np.append(np.asarray(make(self.texts), dtype=bool), beyond)
        return arr

    def lookup(self, key: Hashable, make: Callable[[list[str]], np.ndarray], ids: np.ndarray,
               beyond: bool = True) -> np.ndarray:
        """`derived(key, make, beyond)` at token ids `ids` (ids outside the vocabulary read the last entry)."""
        arr = self.derived(key, make, beyond)
        return arr[np.minimum(np.asarray(ids, dtype=np.int64), len(arr) - 1)]


def _piece_texts(tokenizer: Any) -> list[str]:
    """Each id's text as it reads after ordinary text: decode(anchor + id) minus decode(anchor), which keeps the
    leading space SentencePiece tokenizers drop when a token is decoded alone. Special tokens keep their text."""
    n = len(tokenizer)
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:] or [0]
    rust = getattr(tokenizer, "_tokenizer", None)
    pairs = [anchor + [i] for i in range(n)]
    if rust is not None:
        base = rust.decode(anchor, skip_special_tokens=False)
        decoded = rust.decode_batch(pairs, skip_special_tokens=False)
    else:
        base = tokenizer.decode(anchor, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        decoded = [tokenizer.decode(p, skip_special_tokens=False, clean_up_tokenization_spaces=False) for p in pairs]
    k = len(base)
    return [d[k:] if d.startswith(base) else d for d in decoded]


__all__ = ["TokenTable"]
