"""Incremental detokenisation: the fast path (the tokenizers library's DecodeStream) gives exactly the pieces of the
window method, and the pieces add up to decoding everything at once."""

from __future__ import annotations

import random

import pytest

from monitor.backends.detokenize import IncrementalDetokenizer
from monitor.models import load_model

TEXT = ("Let me think. Wait — 12 × 7 = 84 ✓. 日本語のテキスト 😀 émigré\n\n**So** the answer is $\\boxed{84}$. " * 3)


class _SlowOnly:
    """The same tokenizer without its Rust backend: forces the window method."""

    def __init__(self, tok):
        self._tok = tok

    def decode(self, *a, **k):
        return self._tok.decode(*a, **k)


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-random", device="cpu", dtype="float32").tokenizer


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_fast_and_window_detokenisers_give_the_same_pieces(tok, seed):
    prompt = tok.encode("Question: how many?", add_special_tokens=False)
    if seed is None:
        ids = tok.encode(TEXT, add_special_tokens=False)
    else:
        rng = random.Random(seed)
        ids = [rng.randrange(len(tok)) for _ in range(400)]  # arbitrary ids: split characters, special tokens
    fast = IncrementalDetokenizer(tok, prompt)
    slow = IncrementalDetokenizer(_SlowOnly(tok), prompt)
    assert fast._stream is not None and slow._stream is None
    a = [fast.push(i) for i in ids]
    b = [slow.push(i) for i in ids]
    assert a == b
    if seed is None:
        assert "".join(a) == tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
