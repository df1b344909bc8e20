"""How fast can the default run be on this machine? A floor from counted work, beside the measured times.

    python docs/time_budget.py [RUN_DIR] [--out docs/time_budget.md]

RUN_DIR is a finished run of the default workflow (default: the current folder): its config,
data, base model, reward model, alignment metrics and Snakemake benchmark files. For every
training and sampling job the script counts the matrix multiplications the job cannot skip —
projections and MLPs of every transformer block a token passes, the LM head where a
log-probability or a next token is needed, twice that again for the backward of trained
blocks, once for the gradient that flows through a frozen LM head — on real tokens only (no
padding, token counts from the run's own data and sampled lengths). Attention scores,
norms, optimizers, tokenisation, evaluations of held-out data, reward scoring of samples, the
gold reward and everything else are left out, so each floor is a lower bound.

The floor of a job is its count divided by the best rate at which this machine multiplies
float32 matrices of the run's shapes with the job's threads (measured here, now); the floor of the whole
DAG is the total count divided by the machine's best rate (every core busy). The table puts the
measured seconds of each job (benchmarks/<rule>/<name>.tsv) beside its floor.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import yaml
from transformers import AutoTokenizer

from fdpipe.stages.readme_tables import machine


def matmul_rate(threads: int, repeats: int = 30) -> float:
    """The best FLOP/s of float32 matrix products among the run's shapes (a block's projections
    and MLP, the LM head; training-sized and sampling-sized rows). Using the best shape for all
    the work keeps the floor a lower bound: smaller products only run slower."""
    torch.set_num_threads(threads)
    shapes = [(512, 576, 1536), (512, 1536, 576), (768, 576, 1536), (384, 576, 49152), (32, 576, 49152)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        reps = max(2, repeats * 512 * 1536 // (m * n))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2.0 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def decoder_costs(config: dict) -> tuple[float, float]:
    """FLOPs per token of one decoder block (projections + MLP) and of the LM head."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = h * config.get("num_key_value_heads", config["num_attention_heads"]) // config["num_attention_heads"]
    block = 2.0 * (h * h + 2 * h * kv + h * h + 3 * h * inter)
    return block, 2.0 * h * config["vocab_size"]


def encoder_block_cost(config: dict) -> float:
    """FLOPs per token of one encoder block (BERT: four projections + a two-matrix MLP)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    return 2.0 * (4 * h * h + 2 * h * inter)


def trained(layers: int, total: int) -> int:
    return total if layers < 0 else min(layers, total)


def backward_blocks(k: int, total: int) -> int:
    """Block-forwards' worth of backward work for k trained blocks: gradients of the weights and
    of the inputs (2 each), except the input gradient of the first one when blocks below it are frozen."""
    return 2 * k - (1 if 0 < k < total else 0)


def count_work(run_dir: Path) -> list[dict]:
    cfg = yaml.safe_load((run_dir / "config" / "config.yaml").read_text())
    base_dir = run_dir / "resources" / "base_model"
    base = json.loads((base_dir / "config.json").read_text())
    encoder = json.loads((run_dir / "results" / "reward" / "model" / "config.json").read_text())
    block, head = decoder_costs(base)
    n_layers = base["num_hidden_layers"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    data = run_dir / "results" / "data"
    jobs = []

    # sft: every real token through every block, LM head on completion tokens (+ EOS)
    s = cfg["sft"]
    sft_df = pd.read_parquet(data / "sft_train.parquet")
    p_len = np.array([len(x) for x in tok(list(sft_df["prompt"]))["input_ids"]])
    c_len = np.array([len(x) + 1 for x in tok(list(sft_df["completion"]), add_special_tokens=False)["input_ids"]])
    total_len = np.minimum(p_len + c_len, s["max_length"])
    c_len = total_len - np.minimum(p_len, s["max_length"] - 1)
    tokens, completions = s["steps"] * s["batch_size"] * total_len.mean(), s["steps"] * s["batch_size"] * c_len.mean()
    k = trained(s["train_layers"], n_layers)
    jobs.append({"job": "sft", "threads": None,
                 "flop": tokens * block * (n_layers + backward_blocks(k, n_layers)) + completions * head * 2})

    # train_reward: chosen and rejected texts forward and backward through every block
    r = cfg["reward"]
    enc_tok = AutoTokenizer.from_pretrained(run_dir / "results" / "reward" / "model")
    prefs = pd.read_parquet(data / "prefs_train.parquet")
    texts = list(prefs["chosen"]) + list(prefs["rejected"])
    r_len = np.minimum([len(x) for x in enc_tok(texts)["input_ids"]], r["max_length"]).mean()
    enc_layers = encoder["num_hidden_layers"]
    k = trained(r.get("train_layers", -1), enc_layers)
    jobs.append({"job": "train_reward", "threads": None,
                 "flop": r["steps"] * 2 * r["batch_size"] * r_len * encoder_block_cost(encoder)
                         * (enc_layers + backward_blocks(k, enc_layers))})

    # align: sampling (one prefill per prompt, then every sampled token through the model),
    # base scoring and the policy's forward/backward on the last k blocks (trunk shared)
    prompts = pd.read_parquet(data / "prompts_train.parquet")["prompt"]
    prompt_len = np.mean([len(x) for x in tok(list(prompts))["input_ids"]])
    defaults, runs = cfg["alignment"]["defaults"], cfg["alignment"]["runs"]
    for name in cfg["alignment"].get("select") or runs:
        run = {**defaults, **(runs[name] or {})}
        metrics = pd.read_parquet(run_dir / "results" / "align" / name / "metrics.parquet")
        new = float(metrics["completion_length"].mean())
        rows = run["prompts_per_step"] * run["samples_per_prompt"]
        k = trained(run["train_layers"], n_layers)
        per_step = (run["prompts_per_step"] * prompt_len * block * n_layers
                    + rows * new * (block * n_layers + head)             # sampling
                    + rows * new * (block * k + head)                    # base log-probs on the trunk
                    + rows * new * (block * (k + backward_blocks(k, n_layers)) + 2 * head))  # policy fwd + bwd
        fit = 0.0
        if run["target"]["kind"] == "distributional":
            fit = run.get("fit_samples", 128) * new * (block * n_layers + head)
        jobs.append({"job": f"align {name}", "threads": 1, "flop": run["steps"] * per_step + fit})

    # evaluate: sampling the held-out prompts with every policy (and the SFT model)
    e = cfg["evaluation"]
    n_prompts = len(pd.read_parquet(data / "prompts_eval.parquet"))
    if e.get("max_prompts"):
        n_prompts = min(n_prompts, e["max_prompts"])
    for name in ["sft", *(cfg["alignment"].get("select") or runs)]:
        samples = pd.read_parquet(run_dir / "results" / "eval" / name / "samples.parquet")
        new = float(np.mean([len(x) for x in tok(list(samples["completion"]), add_special_tokens=False)["input_ids"]]))
        jobs.append({"job": f"evaluate {name}", "threads": 1,
                     "flop": n_prompts * (prompt_len * block * n_layers
                                          + e["samples_per_prompt"] * new * (block * n_layers + head))})
    return jobs


def measured_seconds(run_dir: Path, job: str) -> float:
    rule, _, name = job.partition(" ")
    path = run_dir / "benchmarks" / rule / f"{name or rule}.tsv"
    return float(pd.read_csv(path, sep="\t")["s"].iloc[0]) if path.exists() else float("nan")


def table(run_dir: Path, cores: int = 2) -> tuple[str, dict]:
    rates = {t: matmul_rate(t) for t in range(1, cores + 1)}
    best = max(max(rates.values()), cores * rates[1])
    jobs = count_work(run_dir)
    lines = ["| job | threads | TFLOP counted | floor (s) | measured (s) | measured / floor |",
             "|---|---:|---:|---:|---:|---:|"]
    for job in jobs:
        threads = job["threads"] or cores
        floor = job["flop"] / rates[threads]
        seconds = measured_seconds(run_dir, job["job"])
        lines.append(f"| {job['job']} | {threads} | {job['flop'] / 1e12:.2f} | {floor:.0f} | {seconds:.0f} "
                     f"| {seconds / floor:.2f} |")
    total = sum(j["flop"] for j in jobs)
    summary = {"rate_1_thread_gflops": rates[1] / 1e9, f"rate_{cores}_threads_gflops": rates[cores] / 1e9,
               "best_rate_gflops": best / 1e9, "total_tflop": total / 1e12, "dag_floor_s": total / best}
    return "\n".join(lines), summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=".")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "results" / "report").is_dir():
        sys.exit(f"{run_dir}: expected a finished default run (results/report missing)")
    rows, s = table(run_dir, args.cores)
    meta = json.loads(pq.read_schema(run_dir / "results" / "report" / "summary.parquet").metadata[b"fdpipe"])
    text = (f"Run of commit `{meta.get('code_version', '?')}`, counted and timed on {datetime.date.today()}; machine: "
            f"{machine()}; torch {torch.__version__}; `python docs/time_budget.py {args.run_dir}`.\n\n"
            f"Matrix products here: {s['rate_1_thread_gflops']:.1f} GFLOP/s on 1 thread, "
            f"{s[f'rate_{args.cores}_threads_gflops']:.1f} on {args.cores}; best use of the machine "
            f"{s['best_rate_gflops']:.1f} GFLOP/s.\n\n{rows}\n\n"
            f"Work counted for the whole DAG: {s['total_tflop']:.1f} TFLOP, so no schedule on this machine "
            f"finishes it in less than **{s['dag_floor_s'] / 60:.1f} min** of matrix products alone.\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
