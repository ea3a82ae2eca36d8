"""embeddings: word + position + token-type lookup and LayerNorm in one pass, against
``embeddings_reference``."""
import pytest
import torch

from qa_app.kernels.embeddings import embeddings, embeddings_reference


def _tables(hidden=24):
    return (torch.randn(50, hidden), torch.randn(40, hidden), torch.randn(2, hidden),
            torch.rand(hidden) + 0.5, torch.randn(hidden))


@pytest.mark.parametrize("with_types", [False, True])
def test_matches_reference(close, with_types):
    """37 packed tokens (ragged against the 16-row block), hidden 24 (not a power of two), with and without
    token type ids (none means type 0 everywhere)."""
    word, pos, types, w, b = _tables()
    ids, positions = torch.randint(0, 50, (37,)), torch.randint(0, 40, (37,))
    type_ids = torch.randint(0, 2, (37,)) if with_types else None
    got = embeddings(ids, positions, type_ids, word, pos, types, w, b, 1e-12)
    close(got, embeddings_reference(ids, positions, type_ids, word, pos, types, w, b, 1e-12))


def test_token_types_used(close):
    """All-ones token types differ from none (type 0): the type table row is really looked up."""
    word, pos, types, w, b = _tables()
    ids, positions = torch.randint(0, 50, (37,)), torch.randint(0, 40, (37,))
    ones = torch.ones(37, dtype=torch.int64)
    got = embeddings(ids, positions, ones, word, pos, types, w, b, 1e-12)
    close(got, embeddings_reference(ids, positions, ones, word, pos, types, w, b, 1e-12))
    assert not torch.allclose(got, embeddings(ids, positions, None, word, pos, types, w, b, 1e-12), atol=1e-3)
