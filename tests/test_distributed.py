"""Data parallelism: two gloo processes compute what one process computes on the same batch.

The f-DPG update is checked on the exact toy space (two processes, each holding one prompt's
samples of a shared global batch, against one process holding both); the stages (SFT, reward
model, alignment) are run for real under torchrun with two processes on tiny models.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import subprocess

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import tiny_assets
from fdpipe.common.io import read_metadata, read_parquet
from fdpipe.fdpg import toy
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.fdpg.targets import Target
from fdpipe.models import causal_lm
from fdpipe.models.reward_model import resolve_backbone
from fdpipe.stages import align, data, reward, sft
from fdpipe.training import distributed
from fdpipe.training.distributed import World

# ----------------------------------------------------------------------------- World


def test_a_world_of_one_changes_nothing():
    world = World()
    x = torch.arange(5.0)
    assert world.shard([1, 2, 3]) == [1, 2, 3]
    assert world.gather(x) is x and world.sum(x) is x and world.gather_objects("a") == ["a"]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 2.0])
    world.sum_gradients([p])
    assert p.grad.tolist() == [1.0, 2.0]
    assert World(rank=1, size=2).shard([0, 1, 2, 3, 4]) == [1, 3]


# ----------------------------------------------------------------------------- the f-DPG update

SPACE = toy.ToySpace(num_content=3, num_prompts=2, max_length=3)
SAMPLES_PER_PROMPT = 16


# chi2 trains on a target over named features (two moments and a condition): their per-sample
# values are pooled over the processes like every other per-sample quantity
FEATURES = {"has_a": {"kind": "words", "words": ["a"]}, "long": {"kind": "regex", "pattern": r"^\S+ \S+"},
            "good": {"kind": "reward", "threshold": 0.0}}
FEATURE_TARGET = {"kind": "distributional",
                  "features": {"has_a": {"moment": 0.5}, "long": {"moment": 0.6}, "good": {"epsilon": 0.2}}}


def _problem(divergence: str):
    if divergence == "chi2":
        target = Target.from_config(FEATURE_TARGET, definitions=FEATURES)
    elif divergence == "fkl":
        target = Target(kind="pointwise", threshold=0.0, epsilon=0.05)
    else:
        target = Target(kind="rlhf", beta=1.0)
    return toy.build_problem(SPACE, target, model_seed=3, reward_seed=4)


def _aligner(problem, cfg, world=World()):
    prompts = PromptCycle(problem.prompt_keys(), problem.prompt_tokens(), 0)
    return Aligner(problem.policy, problem.base, problem.reward, problem.target, prompts, cfg,
                   generator=torch.Generator().manual_seed(0), world=world, feature_fn=problem.features)


def _global_samples(problem):
    """Both prompts, SAMPLES_PER_PROMPT completions each, from a fixed generator."""
    return problem.policy.sample(problem.prompt_tokens(), SAMPLES_PER_PROMPT,
                                 generator=torch.Generator().manual_seed(11), prompt_keys=problem.prompt_keys())


def _prompt_share(samples, prompt: int):
    """The samples of one prompt, as the process that drew that prompt would hold them."""
    rows = (samples.prompt_index == prompt).nonzero().flatten()
    return dataclasses.replace(
        samples, input_ids=samples.input_ids[rows], attention_mask=samples.attention_mask[rows],
        completion_mask=samples.completion_mask[rows], prompt_index=torch.zeros_like(rows),
        prompt_keys=[samples.prompt_keys[i] for i in rows.tolist()], sample_logprobs=samples.sample_logprobs[rows])


def _one_update(divergence, proposal, world):
    cfg = AlignConfig(divergence=divergence, prompts_per_step=2, samples_per_prompt=SAMPLES_PER_PROMPT,
                      lr=0.1, grad_clip=0.0, proposal=proposal, token_kl=True)
    problem = _problem(divergence)
    aligner = _aligner(problem, cfg, world)
    samples = _global_samples(problem)
    if world.size > 1:
        samples = _prompt_share(samples, world.rank)
    metrics = aligner.learn(samples)
    grads = [p.grad.clone() for p in problem.policy.trainable_parameters()]
    return grads, metrics, [p.detach().clone() for p in problem.policy.trainable_parameters()]


def _fit_on_base_samples(world):
    """λ of the feature target fitted by `prepare_target` on base samples drawn by `world`'s
    processes (each its share of the prompts), and the fitting samples' features."""
    target = Target.from_config(FEATURE_TARGET, definitions=FEATURES)
    problem = toy.build_problem(SPACE, target, model_seed=3, reward_seed=4, fit_exactly=False)
    cfg = AlignConfig(divergence="chi2", prompts_per_step=2, samples_per_prompt=16, fit_samples=64,
                      fit_tolerance=1e-10)
    aligner = _aligner(problem, cfg, world)
    aligner.prepare_target()
    return target.lam, aligner.lambda_fit.moment


def _rank_main(rank, rendezvous, out, cases):
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        world = World(rank=rank, size=2)
        results = {case: _one_update(*case.split("/"), world) for case in cases}
        results["fit"] = world.gather_objects(_fit_on_base_samples(world))
        # each rank's own clock says otherwise: rank 0's decision holds everywhere
        results["decided"] = world.gather_objects([world.main_decides(rank == 0), world.main_decides(rank == 1)])
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


CASES = ["rkl/online", "fkl/online", "js/offline", "tv/online", "chi2/online"]


@pytest.fixture(scope="module")
def two_process_updates(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(str(tmp / "rendezvous"), str(tmp / "out.pt"), CASES), nprocs=2, join=True)
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("case", CASES)
def test_two_process_gradient_equals_one_process_gradient(two_process_updates, case):
    """Same global batch: the summed gradient of two processes equals the one-process gradient
    (float32 parameters: rtol 1e-5, atol 1e-6), and so do the updated parameters."""
    grads_2, _, params_2 = two_process_updates[case]
    grads_1, _, params_1 = _one_update(*case.split("/"), World())
    for g2, g1 in zip(grads_2, grads_1):
        assert g1.abs().max() > 1e-3                      # a gradient worth comparing
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)
    for p2, p1 in zip(params_2, params_1):
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_two_process_metrics_are_pooled_over_the_global_batch(two_process_updates, case):
    _, metrics_2, _ = two_process_updates[case]
    _, metrics_1, _ = _one_update(*case.split("/"), World())
    samples = _global_samples(_problem(case.split("/")[0]))
    assert metrics_1["completion_length"] == pytest.approx(samples.lengths().double().mean().item())
    for name, value in metrics_1.items():
        if name.startswith("time_") or name in ("step",):
            continue
        assert metrics_2[name] == pytest.approx(value, rel=1e-6, abs=1e-6, nan_ok=True), name


def test_feature_metrics_are_pooled(two_process_updates):
    _, metrics_2, _ = two_process_updates["chi2/online"]
    assert {"feature_has_a", "feature_long", "feature_good", "lambda_has_a", "lambda_long"} <= set(metrics_2)


def test_rank_0_decides_for_every_rank(two_process_updates):
    """A time-based save is decided on rank 0's clock, so every rank joins the same saves."""
    assert two_process_updates["decided"] == [[True, False], [True, False]]


def test_two_processes_fit_one_lambda_on_their_pooled_samples(two_process_updates):
    """Both processes fit the same λ on the samples of both (each drew one prompt's), and it
    reproduces the requested moments on those samples."""
    (lam_0, moments_0), (lam_1, moments_1) = two_process_updates["fit"]
    assert lam_0 == lam_1 and len(lam_0) == 2
    assert moments_0 == pytest.approx((0.5, 0.6), abs=1e-9)


# ----------------------------------------------------------------------------- stages under torchrun

DATA_CFG = {"source": "x.csv", "text_column": "text", "rating_column": "rating",
            "val_fraction": 0.1, "eval_fraction": 0.1, "prompt_words": 3, "pair_margin": 1.5,
            "pairs_train": 32, "pairs_val": 8, "max_prompts_train": 8, "max_prompts_eval": 4}
SFT_CFG = {"steps": 6, "batch_size": 8, "lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 2,
           "max_length": 24, "train_layers": -1, "eval_every": 3, "eval_batches": 2,
           "grad_clip": 1.0, "checkpoint_every": 3}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_assets")
    csv = tiny_assets.write_ratings_csv(root / "ratings.csv", n=200)
    outs = {name: root / "data" / f"{name}.parquet" for name in data.OUTPUTS}
    data.run({**DATA_CFG, "source": str(csv)}, 0, csv, outs)
    lm = tiny_assets.build_tiny_lm(root / "lm")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("embedded"))
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))   # dropout draws differ per process
    bert.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    return {"root": root, "lm": lm, "reward": root / "reward", **outs}


def _sft(assets, out, processes):
    return sft.run(model_path=assets["lm"], train_path=assets["sft_train"], val_path=assets["sft_val"], cfg=SFT_CFG,
                   seed=0, out_dir=out / "model", metrics_path=out / "metrics.parquet", state_path=out / "state.pt",
                   device="cpu", threads=2, processes=processes)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def one_process_sft(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_one")
    return out, _sft(assets, out, 1)


def _same_sft(one, two, one_dir, two_dir):
    """Same files, same loss curve (timing aside) and same weights, up to float32 summation order."""
    assert _files(one_dir) == _files(two_dir)                       # rank 0 alone wrote, state removed
    keep = ~one["metric"].isin(["tokens_per_s", "seconds"])
    pd.testing.assert_frame_equal(two[keep].reset_index(drop=True), one[keep].reset_index(drop=True),
                                  check_exact=False, rtol=1e-4, atol=1e-5)
    a = causal_lm.load_causal_lm(one_dir / "model").state_dict()
    b = causal_lm.load_causal_lm(two_dir / "model").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sft_in_two_processes_follows_the_one_process_loss_curve(assets, tmp_path, one_process_sft):
    one_dir, one = one_process_sft
    two = _sft(assets, tmp_path / "two", 2)
    _same_sft(one, two, one_dir, tmp_path / "two")
    assert read_metadata(tmp_path / "two" / "metrics.parquet")["processes"] == 2


def test_sft_across_two_launchers_meeting_at_a_rendezvous(assets, tmp_path, one_process_sft):
    """Two nodes as SLURM would start them (one torchrun each, c10d rendezvous on the first),
    here two launchers on localhost: one job of two processes, the one-process result."""
    one_dir, one = one_process_sft
    out = tmp_path / "nodes"
    kwargs = dict(model_path=assets["lm"], train_path=assets["sft_train"], val_path=assets["sft_val"], cfg=SFT_CFG,
                  seed=0, out_dir=out / "model", metrics_path=out / "metrics.parquet", state_path=out / "state.pt",
                  device="cpu", threads=2)
    distributed.write_spec(tmp_path / "spec.json", sft.run, kwargs, processes=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = distributed.torchrun_command(tmp_path / "spec.json", 2, nodes=2, endpoint=f"127.0.0.1:{port}", run_id="t")
    assert "--standalone" not in cmd and "--nproc_per_node=1" in cmd
    launchers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(logs)[-3000:]
    _same_sft(one, read_parquet(out / "metrics.parquet"), one_dir, out)
    assert read_metadata(out / "metrics.parquet")["processes"] == 2


def test_reward_model_in_two_processes_follows_the_one_process_curve(assets, tmp_path):
    cfg = {"steps": 4, "batch_size": 8, "max_length": 24, "eval_every": 2, "checkpoint_every": 2}
    runs = {}
    for n in (1, 2):
        out = tmp_path / str(n)
        runs[n] = reward.run(backbone=str(assets["reward"]), prefs_train_path=assets["prefs_train"],
                             prefs_val_path=assets["prefs_val"], ratings_path=assets["sft_val"], cfg=cfg, seed=0,
                             out_dir=out / "model", metrics_path=out / "metrics.parquet",
                             state_path=out / "state.pt", device="cpu", threads=2, processes=n)
    assert _files(tmp_path / "1") == _files(tmp_path / "2")
    m1, m2 = (read_parquet(tmp_path / str(n) / "metrics.parquet").query("metric != 'elapsed_s'") for n in (1, 2))
    pd.testing.assert_frame_equal(m2.reset_index(drop=True), m1.reset_index(drop=True),
                                  check_exact=False, rtol=1e-4, atol=1e-5)
    assert runs[2]["pair_accuracy"] == pytest.approx(runs[1]["pair_accuracy"])


def test_align_in_two_processes_writes_what_one_process_writes(assets, tmp_path):
    run_cfg = {"divergence": "js", "steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "lr": 1e-3,
               "train_layers": -1, "max_new_tokens": 4, "checkpoint_every": 1,
               "target": {"kind": "rlhf", "beta": 1.0}}
    frames = {}
    for n in (1, 2):
        out = tmp_path / str(n)
        frames[n] = align.run(sft_model=assets["lm"], reward_model=assets["reward"],
                              prompts_path=assets["prompts_train"], run_name="js", run_cfg=run_cfg, seed=0,
                              out_model=out / "model", out_metrics=out / "metrics.parquet",
                              out_target=out / "target.json", state_path=out / "state.pt", device="cpu",
                              threads=2, processes=n)
    assert _files(tmp_path / "1") == _files(tmp_path / "2")
    assert list(frames[2].columns) == list(frames[1].columns) and list(frames[2]["step"]) == [1, 2]
    assert (frames[2]["logprob_gap"] < 1e-4).all()                 # each rank trains on its own samples
    assert json.loads((tmp_path / "2" / "target.json").read_text())["kind"] == "rlhf"
    assert read_metadata(tmp_path / "2" / "metrics.parquet")["processes"] == 2


def test_processes_must_fit_the_batch(assets, tmp_path):
    from fdpipe.common.errors import ConfigError

    with pytest.raises(ConfigError, match="'sft.batch_size': expected at least sft.processes"):
        sft.run(model_path=assets["lm"], train_path=assets["sft_train"], val_path=assets["sft_val"],
                cfg={**SFT_CFG, "batch_size": 2}, seed=0, out_dir=tmp_path / "m", metrics_path=tmp_path / "x.parquet",
                state_path=tmp_path / "s.pt", processes=4)
    with pytest.raises(ConfigError, match="'sft.processes': expected an integer >= 1"):
        sft.run(model_path=assets["lm"], train_path=assets["sft_train"], val_path=assets["sft_val"], cfg=SFT_CFG,
                seed=0, out_dir=tmp_path / "m", metrics_path=tmp_path / "x.parquet", state_path=tmp_path / "s.pt",
                processes=0)
