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
def test_corpus_tokens_are_consecutive_chunks_from_the_start(smollm2):
    text = corpus_text()
    ids = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = corpus_tokens(smollm2, 3, 50)
    assert tokens.shape == (3, 50) and tokens.dtype == torch.long
    assert tokens.flatten().tolist() == ids[:150]
    assert 1 not in tokens[:, 0].tolist()  # no BOS unless asked


@pytest.mark.integration
def test_corpus_tokens_first_token(smollm2):
    plain = corpus_tokens(smollm2, 2, 40)
    with_bos = corpus_tokens(smollm2, 2, 40, first_token="bos")
    assert with_bos.shape == (2, 40)
    assert with_bos[:, 0].tolist() == [1, 1]  # <|im_start|>
    assert with_bos[:, 1:].flatten().tolist() == plain.flatten()[:78].tolist()
    eot = corpus_tokens(smollm2, 1, 8, first_token="<|endoftext|>")
    assert eot[0, 0].item() == smollm2.tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    newline = corpus_tokens(smollm2, 1, 8, first_token="\n")
    assert smollm2.tokenizer.decode(newline[0, :1]) == "\n"


@pytest.mark.integration
def test_corpus_tokens_custom_text(smollm2):
    tokens = corpus_tokens(smollm2, 1, 4, text="one two three four five")
    assert smollm2.tokenizer.decode(tokens[0]) == "one two three four"


@pytest.mark.integration
def test_corpus_request_the_text_cannot_fill(smollm2):
    with pytest.raises(SinkInterpError, match=r"the text has 5 tokens but 2 sequences of 4 text tokens need 8: ask for at most 1 sequences"):
        corpus_tokens(smollm2, 2, 4, text="one two three four five")
    with pytest.raises(SinkInterpError, match=r"the text has \d+ tokens but 100000 sequences of 64"):
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
