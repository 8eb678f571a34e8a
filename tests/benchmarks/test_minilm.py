"""The MiniLM benchmark's own training text (needs no download)."""

from __future__ import annotations

from benchmarks import minilm


def test_prose_sentences_are_prose_disjoint_from_the_evaluation_sentences() -> None:
    prose = minilm.prose_sentences()
    assert len(prose) > 5000  # CPython's docstrings give about 7,500
    assert prose == sorted(set(prose))  # deterministic order, no repeats
    assert not set(prose) & set(minilm.SENTENCES)
    for s in prose:
        assert 6 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?"
        assert not any(c in s for c in ("=", "()", "[", "{", ">>>", "::"))
