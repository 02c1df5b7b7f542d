import pytest
import torch

from sinkinterp import SinkInterpError
from sinkinterp.data import corpus_text, corpus_tokens, random_tokens, repeated_random_tokens, resolve_token
from sinkinterp.tiny import tiny_llama


def test_corpus_text_is_deterministic_english():
    text = corpus_text()
    assert text == corpus_text()
    assert len(text) > 400_000
    assert "The assert statement" in text or "assert" in text


@pytest.mark.integration
def test_consecutive_sampling_is_chunks_from_the_start(smollm2):
    text = corpus_text()
    ids = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = corpus_tokens(smollm2, 3, 50, sampling="consecutive")
    assert tokens.shape == (3, 50) and tokens.dtype == torch.long
    assert tokens.flatten().tolist() == ids[:150]
    assert 1 not in tokens[:, 0].tolist()  # no BOS unless asked
    assert torch.equal(corpus_tokens(smollm2, 3, 50, sampling="consecutive", seed=7), tokens)  # no seed


def _find(row: list[int], docs: list[list[int]]) -> list[tuple[int, int]]:
    """(document, offset) of every place ``row`` occurs as a contiguous slice."""
    n = len(row)
    return [(d, i) for d, ids in enumerate(docs) for i in range(len(ids) - n + 1) if ids[i:i + n] == row]


@pytest.mark.integration
def test_windows_lie_inside_one_document_never_overlap_and_span_the_corpus(smollm2):
    from sinkinterp.data import corpus_documents

    docs = [smollm2.tokenizer(d, add_special_tokens=False)["input_ids"] for d in corpus_documents()]
    assert len(docs) == 57  # 22 of the 79 pydoc topics repeat others' text
    tokens = corpus_tokens(smollm2, 40, 64)
    assert tokens.shape == (40, 64)
    places, unique = [], []
    for row in tokens.tolist():
        found = _find(row, docs)
        assert found, "a window that is not a slice of one document (it crosses a boundary)"
        places.append(found[0])
        if len(found) == 1:  # a few short passages still occur twice
            unique.append(found[0])
    assert len(unique) >= 38
    spans = sorted((d, i, i + 64) for d, i in unique)
    for (d1, _, end1), (d2, start2, _) in zip(spans, spans[1:]):
        assert d1 != d2 or end1 <= start2, "two windows overlap"
    # Drawn from across the corpus, weighted by document length (long topics hold more windows):
    # 40 windows fall on 14 of the 57 topics with seed 0, from both halves of the corpus.
    homes = {d for d, _ in places}
    assert len(homes) >= 10 and min(homes) < 20 and max(homes) > 40
    # The old rule took every row from the first 40 x 64 tokens of the joined text.
    first = corpus_tokens(smollm2, 40, 64, sampling="consecutive")
    assert not torch.equal(first, tokens)


@pytest.mark.integration
def test_windows_are_seeded_and_a_smaller_draw_is_a_prefix(smollm2):
    tokens = corpus_tokens(smollm2, 24, 48, seed=3)
    assert torch.equal(corpus_tokens(smollm2, 24, 48, seed=3), tokens)
    assert torch.equal(corpus_tokens(smollm2, 8, 48, seed=3), tokens[:8])  # calibration split is stable
    other = corpus_tokens(smollm2, 24, 48, seed=4)
    assert not torch.equal(other, tokens)
    rows = {tuple(r) for r in tokens.tolist()}
    assert len(rows) == 24  # no repeated window


@pytest.mark.integration
def test_windows_of_given_documents(smollm2):
    docs = ["alpha beta gamma delta epsilon zeta", "one two three four five six seven eight nine ten"]
    ids = [smollm2.tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    capacity = sum(len(i) // 4 for i in ids)
    tokens = corpus_tokens(smollm2, capacity, 4, text=docs, seed=1)
    assert all(_find(r, ids) for r in tokens.tolist())
    with pytest.raises(SinkInterpError, match=rf"holds {capacity} non-overlapping windows of 4 text tokens "
                                              rf"within its 2 document\(s\) but {capacity + 1} sequences"):
        corpus_tokens(smollm2, capacity + 1, 4, text=docs)
    # Documents that are not strings: tests/bad_api.py (the suite's type checker answers first here).
    with pytest.raises(SinkInterpError, match=r"sampling must be one of \('windows', 'consecutive'\), got 'start'"):
        corpus_tokens(smollm2, 1, 4, sampling="start")


@pytest.mark.integration
def test_corpus_tokens_first_token(smollm2):
    plain = corpus_tokens(smollm2, 2, 40, sampling="consecutive")
    with_bos = corpus_tokens(smollm2, 2, 40, first_token="bos", sampling="consecutive")
    assert with_bos.shape == (2, 40)
    assert with_bos[:, 0].tolist() == [1, 1]  # <|im_start|>
    assert with_bos[:, 1:].flatten().tolist() == plain.flatten()[:78].tolist()
    eot = corpus_tokens(smollm2, 1, 8, first_token="<|endoftext|>")
    assert eot[0, 0].item() == smollm2.tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    newline = corpus_tokens(smollm2, 1, 8, first_token="\n")
    assert smollm2.tokenizer.decode(newline[0, :1]) == "\n"


@pytest.mark.integration
def test_corpus_tokens_custom_text(smollm2):
    tokens = corpus_tokens(smollm2, 1, 4, text="one two three four five", sampling="consecutive")
    assert smollm2.tokenizer.decode(tokens[0]) == "one two three four"
    # A window of 4 of the 5 tokens starts at a seeded offset 0 or 1.
    starts = {smollm2.tokenizer.decode(corpus_tokens(smollm2, 1, 4, text="one two three four five", seed=s)[0])
              for s in range(8)}
    assert starts == {"one two three four", " two three four five"}


@pytest.mark.integration
def test_corpus_request_the_text_cannot_fill(smollm2):
    with pytest.raises(SinkInterpError, match=r"the text has 5 tokens but 2 sequences of 4 text tokens need 8: ask for at most 1 sequences"):
        corpus_tokens(smollm2, 2, 4, text="one two three four five", sampling="consecutive")
    with pytest.raises(SinkInterpError, match=r"the text holds 1 non-overlapping windows of 4 text tokens within its 1 document"):
        corpus_tokens(smollm2, 2, 4, text="one two three four five")
    with pytest.raises(SinkInterpError, match=r"the text holds 1396 non-overlapping windows of 64 text tokens within its 57 document\(s\) but 100000"):
        corpus_tokens(smollm2, 100_000, 64)


@pytest.mark.integration
def test_multi_token_first_token_is_refused(smollm2):
    with pytest.raises(SinkInterpError, match=r"first token 'hello world' is not a single token: it encodes to 2 tokens"):
        corpus_tokens(smollm2, 1, 8, first_token="hello world")


def test_random_tokens_are_seeded_and_in_vocab():
    model = tiny_llama()
    a = random_tokens(model, 4, 20, seed=1)
    assert a.shape == (4, 20)
    assert torch.equal(a, random_tokens(model, 4, 20, seed=1))
    assert not torch.equal(a, random_tokens(model, 4, 20, seed=2))
    assert 0 <= a.min() and a.max() < model.cfg.d_vocab


@pytest.mark.integration
def test_random_tokens_skip_special_tokens(smollm2):
    tokens = random_tokens(smollm2, 8, 512, seed=0, first_token="bos")
    assert tokens[:, 0].eq(1).all()
    special = set(smollm2.tokenizer.all_special_ids)
    assert special and not special & set(tokens[:, 1:].flatten().tolist())


def test_repeated_random_tokens_halves_align():
    model = tiny_llama()
    tokens = repeated_random_tokens(model, 3, 10, seed=5)
    assert tokens.shape == (3, 20)
    assert torch.equal(tokens[:, :10], tokens[:, 10:])
    with_first = repeated_random_tokens(model, 3, 10, seed=5, first_token=7)
    assert with_first.shape == (3, 21) and with_first[:, 0].eq(7).all()
    assert torch.equal(with_first[:, 1:], tokens)


def test_bad_requests_name_the_value():
    model = tiny_llama()
    with pytest.raises(SinkInterpError, match=r"seq_len 65 exceeds the model's context: n_ctx = 64"):
        random_tokens(model, 1, 65)
    with pytest.raises(SinkInterpError, match=r"n_seqs must be an integer >= 1, got 0"):
        random_tokens(model, 0, 8)
    with pytest.raises(SinkInterpError, match=r"seq_len must be an integer >= 2, got 1"):
        random_tokens(model, 1, 1, first_token=3)
    with pytest.raises(SinkInterpError, match=r"token id 67 out of range: vocabulary is 0..66"):
        resolve_token(model, 67)
    with pytest.raises(SinkInterpError, match=r"(HookedTransformer|TransformerBridge) has no tokenizer, so it cannot tokenize text"):
        corpus_tokens(model, 1, 8)
    with pytest.raises(SinkInterpError, match=r"seq_len 66 exceeds"):
        repeated_random_tokens(model, 1, 33)


@pytest.mark.integration
def test_corpus_windows_are_seeded_slices_of_the_text(smollm2):
    from sinkinterp.data import corpus_windows

    text = corpus_text()
    ids = smollm2.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = corpus_windows(smollm2, 4, 32, seed=5)
    assert windows.shape == (4, 32)
    for row in windows.tolist():  # each window is a contiguous run of the tokenized text
        starts = [i for i in range(len(ids) - 31) if ids[i] == row[0] and ids[i : i + 32] == row]
        assert starts
    assert torch.equal(corpus_windows(smollm2, 4, 32, seed=5), windows)
    assert not torch.equal(corpus_windows(smollm2, 4, 32, seed=6), windows)
    with pytest.raises(SinkInterpError, match="fewer than one window of 32"):
        corpus_windows(smollm2, 1, 32, text="too short")


def test_a_string_that_only_maps_to_the_unknown_token_is_refused():
    class WordLevel:  # a tokenizer with an unknown token, as word-level and older BPE vocabularies have
        unk_token, unk_token_id, bos_token_id = "[UNK]", 0, None

        def get_vocab(self):
            return {"[UNK]": 0, "hello": 1}

        def encode(self, text, add_special_tokens=False):
            return [self.get_vocab().get(text, 0)]

    model = tiny_llama()  # a real model (the model parameter is type-checked), with this tokenizer
    model.tokenizer = WordLevel()
    assert resolve_token(model, "hello") == 1 and resolve_token(model, "[UNK]") == 0
    with pytest.raises(SinkInterpError, match=r"first token 'zebra' is not in the vocabulary: it encodes to the "
                                              r"unknown token '\[UNK\]' \(id 0\)"):
        resolve_token(model, "zebra")
