from esa.data.windows import make_windows, tokenize
from esa.evals.sanity import repetition_rate, sanity_warnings


def test_guard_fires_on_repeated_paragraph(tokenizer):
    para = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 100
    rep = repetition_rate([tokenize(tokenizer, para)])
    assert rep > 0.9
    warnings = sanity_warnings(rep, perplexity=1.03, token_accuracy=0.994)
    assert len(warnings) == 3 and "repetitive" in warnings[0]


def test_guard_quiet_on_python_docs(tokenizer, python_docs):
    ws = make_windows(tokenizer, python_docs.documents, "chunks", 512)
    rep = repetition_rate([w.input_ids for w in ws.windows])
    assert rep < 0.5
    assert sanity_warnings(rep, perplexity=15.0, token_accuracy=0.45) == []
