"""Size and write time of the training states of the default run (README "After a crash").

    python docs/state_size.py

Builds each stage's model at the default run's shapes (SmolLM2-135M for `sft` and `align`,
MiniLM-L6 with a scalar head for `train_reward`; random weights, nothing is downloaded), makes
the default trainable set train for one step so that the optimizer holds its moments, and
writes the state the stage writes (`fdpipe.training.checkpoint`), timing `save_state` and
`load_state` over a few repeats.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from fdpipe.models.trainable import set_trainable
from fdpipe.training import checkpoint, optim

# SmolLM2-135M and all-MiniLM-L6-v2 shapes
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
MINILM = BertConfig(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=12, num_labels=1)
STAGES = {"sft (train_layers 6)": (lambda: LlamaForCausalLM(SMOLLM2), 6, False),
          "align (train_layers 2)": (lambda: LlamaForCausalLM(SMOLLM2), 2, False),
          "train_reward (every parameter)": (lambda: BertForSequenceClassification(MINILM), -1, True)}


def measure(build, layers: int, head: bool, repeats: int = 5) -> dict:
    torch.manual_seed(0)
    model = build()
    params = set_trainable(model, layers, key="train_layers", train_head=head)
    opt = optim.adamw(params, 1e-4, 0.0)
    sum(p.float().pow(2).sum() for p in params).backward()
    opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        writes, reads = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            checkpoint.save_state(path, "fp", step=1, **checkpoint.training_snapshot(model, opt))
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpoint.load_state(path, "fp")
            reads.append(time.perf_counter() - t0)
        size = os.path.getsize(path)
    return {"trainable": sum(p.numel() for p in params), "mb": size / 1e6,
            "write_s": statistics.median(writes), "read_s": statistics.median(reads)}


def main() -> None:
    print("| stage | trainable parameters | state (MB) | write (s) | read (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, (build, layers, head) in STAGES.items():
        m = measure(build, layers, head)
        print(f"| {name} | {m['trainable'] / 1e6:.1f} M | {m['mb']:.0f} | {m['write_s']:.2f} | {m['read_s']:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
