import numpy as np
import pytest
import torch

from esa.data.windows import chunk_windows, make_windows, rolling_windows, select_windows, sliding_windows
from esa.core.errors import EsaError


def _scored_positions(windows):
    """Corpus offsets of scored tokens (for chunk/sliding windows without BOS)."""
    out = []
    for w in windows:
        out += [w.start + int(i) for i in torch.nonzero(w.scored).flatten()]
    return out


def test_chunks_worked_example():
    tokens = torch.arange(9)  # a..i
    ws = chunk_windows(tokens, 4, None)
    assert [w.input_ids.tolist() for w in ws] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [w.scored.tolist() for w in ws] == [[False, True, True, True]] * 2


def test_chunks_with_bos_score_every_corpus_token():
    ws = chunk_windows(torch.arange(10, 16), 4, bos_id=99)
    assert [w.input_ids.tolist() for w in ws] == [[99, 10, 11, 12], [99, 13, 14, 15]]
    assert all(w.scored.tolist() == [False, True, True, True] for w in ws)


@pytest.mark.parametrize("n, ctx, stride", [(20, 8, 4), (21, 8, 3), (8, 8, 8), (5, 8, 2)])
def test_sliding_scores_each_token_once(n, ctx, stride):
    ws = sliding_windows(torch.arange(n), ctx, stride, None)
    assert sorted(_scored_positions(ws)) == list(range(1, n))
    assert all(len(w.input_ids) <= ctx for w in ws)


@pytest.mark.parametrize("n, ctx", [(10, 4), (3, 4), (8, 4), (1, 4), (9, 3)])
def test_rolling_scores_each_token_once_with_full_left_context(n, ctx):
    toks = torch.arange(100, 100 + n)
    ws = rolling_windows([toks], ctx, prefix_id=7)
    predicted = [int(t) for w in ws for t in w.input_ids[w.scored]]
    assert predicted == toks.tolist()
    assert ws[0].input_ids[0] == 7
    for w in ws:
        assert len(w.input_ids) - 1 <= ctx  # the model reads at most ctx tokens
    if n > ctx:  # the last window keeps a full ctx of inputs
        assert len(ws[-1].input_ids) == ctx + 1


def test_seeds_pick_different_windows_when_budget_is_smaller(tokenizer, python_docs):
    ws = make_windows(tokenizer, python_docs.documents, "chunks", 128)
    a, b = select_windows(ws, 1024, 0), select_windows(ws, 1024, 1)
    assert not a.seed_invariant and not np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.indices, select_windows(ws, 1024, 0).indices)  # reproducible
    assert 1024 - 127 <= a.windows.scored_tokens <= 1024


def test_whole_split_is_seed_invariant(tokenizer):
    ws = make_windows(tokenizer, ("hello world " * 50,), "chunks", 16)
    a, b = select_windows(ws, None, 0), select_windows(ws, 10**9, 5)
    assert a.seed_invariant and b.seed_invariant and np.array_equal(a.indices, b.indices)


def test_bos_auto_follows_tokenizer(tokenizer):
    assert make_windows(tokenizer, ("some text " * 40,), "chunks", 16).bos == "never"  # SmolLM2 adds no BOS
    ws = make_windows(tokenizer, ("some text " * 40,), "chunks", 16, bos="always")
    assert ws.bos == "always" and all(w.input_ids[0] == tokenizer.bos_token_id for w in ws.windows)


def test_bad_window_arguments(tokenizer):
    with pytest.raises(EsaError, match="unknown window method"):
        make_windows(tokenizer, ("x",), "strided", 16)
    with pytest.raises(EsaError, match="--stride"):
        make_windows(tokenizer, ("x " * 50,), "sliding", 16)
    with pytest.raises(EsaError, match="fewer than one"):
        make_windows(tokenizer, ("tiny",), "chunks", 512)
