"""The training toolkit: resumable state, optimizer and schedules, batch order."""
import math

import pytest
import torch

from fdpipe.common.errors import DataError
from fdpipe.training import batches, checkpoint, optim
from fdpipe.training.distributed import World
from fdpipe.training.guards import NonFiniteError, check


# ----------------------------------------------------------------------------- state

def test_state_roundtrip_and_missing_file(tmp_path):
    path = tmp_path / "state.pt"
    assert checkpoint.load_state(path, "fp") is None
    checkpoint.save_state(path, "fp", step=3, metrics=[{"step": 1, "loss": 0.5}], rng=checkpoint.rng_state())
    state = checkpoint.load_state(path, "fp")
    assert state["step"] == 3 and state["metrics"] == [{"step": 1, "loss": 0.5}]
    assert not list(tmp_path.glob(".*.tmp"))   # written atomically, nothing left beside it
    checkpoint.remove_state(path)
    assert not path.exists()


@pytest.mark.parametrize("content,problem", [
    (b"\x00garbage", "corrupt training state"),
    ({"fingerprint": "fp", "step": 1}, "not a training state of this version"),     # no format
    ([1, 2, 3], "not a training state of this version"),
])
def test_unreadable_state_names_the_file_and_the_way_out(tmp_path, content, problem):
    path = tmp_path / "state.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(DataError, match=rf"state.pt: {problem}.*delete it to train from the start"):
        checkpoint.load_state(path, "fp")


def test_state_of_another_run_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save_state(path, "run A", step=1)
    with pytest.raises(DataError, match="state.pt: training state of another run"):
        checkpoint.load_state(path, "run B")
    assert path.exists()   # never deleted behind the user's back


def test_fingerprint_follows_config_seed_and_inputs(tmp_path):
    data = tmp_path / "data.parquet"
    data.write_bytes(b"one")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    base = checkpoint.fingerprint({"lr": 1}, 0, {"data": data, "model": model, "hub": "org/name"})
    assert base == checkpoint.fingerprint({"lr": 1}, 0, {"model": model, "hub": "org/name", "data": data})
    assert base != checkpoint.fingerprint({"lr": 2}, 0, {"data": data, "model": model, "hub": "org/name"})
    assert base != checkpoint.fingerprint({"lr": 1}, 1, {"data": data, "model": model, "hub": "org/name"})
    data.write_bytes(b"two")
    assert base != checkpoint.fingerprint({"lr": 1}, 0, {"data": data, "model": model, "hub": "org/name"})


def test_trainable_tensors_hold_only_what_trains(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)
    saved = checkpoint.trainable_tensors(net)
    assert set(saved) == {"1.weight", "1.bias"}
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    checkpoint.load_tensors(fresh, saved, "state.pt")
    assert torch.equal(fresh[1].weight, net[1].weight) and not torch.equal(fresh[0].weight, net[0].weight)
    with pytest.raises(DataError, match="state.pt: state holds parameter 9.weight"):
        checkpoint.load_tensors(fresh, {"9.weight": torch.zeros(1)}, "state.pt")


def test_save_schedule_by_steps_and_by_seconds(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    schedule = checkpoint.SaveSchedule(every_steps=5, every_seconds=30)
    assert [schedule.due(s) for s in (1, 2, 5)] == [False, False, True]
    clock[0] += 29
    assert not schedule.due(6)
    clock[0] += 1
    assert schedule.due(7)
    schedule.saved()
    assert not schedule.due(8)
    assert not checkpoint.SaveSchedule(every_steps=5).due(3)       # no time limit


def test_non_finite_values_stop_with_the_step_and_the_cause():
    check(4, loss=torch.tensor(1.0), reward=torch.tensor([0.5, -2.0]))
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite reward \(inf\)"):
        check(4, loss=torch.tensor(1.0), reward=torch.tensor([0.5, float("inf")]))
    with pytest.raises(NonFiniteError, match=r"step 9: non-finite loss \(nan\)"):
        check(9, loss=float("nan"))


def test_rng_state_restores_the_stream():
    state = checkpoint.rng_state()
    a = torch.rand(5)
    checkpoint.set_rng_state(state)
    assert torch.equal(a, torch.rand(5))


# ----------------------------------------------------------------------------- optimizer

def test_adamw_without_decay_is_adam_and_decays_matrices_only():
    torch.manual_seed(0)
    w, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    runs = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=0.1), lambda ps: optim.adamw(ps, 0.1)):
        ps = [w.clone().requires_grad_(), b.clone().requires_grad_()]
        opt = make(ps)
        for _ in range(3):
            opt.zero_grad()
            (ps[0].sum() ** 2 + (ps[1] ** 3).sum()).backward()
            opt.step()
        runs.append(ps)
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    groups = optim.adamw([torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)], 0.1, 0.5).param_groups
    assert [(g["params"][0].dim(), g["weight_decay"]) for g in groups] == [(2, 0.5), (1, 0.0)]


def test_clipped_step_returns_the_norm_before_clipping():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    norm = optim.clipped_step(torch.optim.SGD([p], lr=1.0), [p], grad_clip=1.0, step=1)
    assert float(norm) == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))
    p.grad = torch.tensor([3.0, 4.0])
    optim.clipped_step(torch.optim.SGD([p], lr=1.0), [p], grad_clip=0, step=2)   # 0: no clipping
    torch.testing.assert_close(p.detach(), torch.tensor([-3.6, -4.8]))
    p.grad = torch.tensor([float("nan"), 1.0])
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite gradient_norm \(nan\); the last good state is kept in s.pt"):
        optim.clipped_step(torch.optim.SGD([p], lr=1.0), [p], grad_clip=1.0, step=3, state_path="s.pt")
    torch.testing.assert_close(p.detach(), torch.tensor([-3.6, -4.8]))      # untouched


def test_schedules():
    assert [optim.warmup_cosine(s, 2, 10) for s in (0, 1)] == [0.5, 1.0]
    assert optim.warmup_cosine(6, 2, 10) == pytest.approx(0.5) and optim.warmup_cosine(10, 2, 10) == pytest.approx(0.0)
    assert [optim.warmup_linear(s, 2, 10) for s in (0, 1)] == pytest.approx([1 / 3, 2 / 3])
    assert optim.warmup_linear(6, 2, 10) == pytest.approx(0.5) and optim.warmup_linear(12, 2, 10) == 0.0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = optim.lr_schedule(opt, "cosine", 2, 10)
    assert sched.get_last_lr()[0] == pytest.approx(1.0)
    assert math.isclose(optim.SCHEDULES["linear"](3, 2, 10), optim.warmup_linear(3, 2, 10))


# ----------------------------------------------------------------------------- batches

def test_epoch_batches_are_seeded_epochs_end_to_end():
    seen = [batches.epoch_batches(s, 4, 10, 0) for s in range(5)]  # two full epochs
    flat = torch.tensor([int(i) for b in seen for i in b])
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))
    assert (batches.epoch_batches(3, 4, 10, 0) == seen[3]).all()
    assert not (batches.epoch_batches(0, 4, 10, 1) == seen[0]).all()


def test_length_bucketed_batches_are_epoch_permutations_bucketed_by_length():
    lengths = torch.tensor([5, 1, 9, 3, 7, 2, 8, 4, 6, 0])
    first = [batches.length_bucketed_batches(s, lengths, 3, seed=5) for s in range(3)]
    assert len(set(torch.cat(first).tolist())) == 9  # 3 full batches per epoch, no repeats
    assert all(torch.equal(a, batches.length_bucketed_batches(s, lengths, 3, seed=5)) for s, a in enumerate(first))
    later = [batches.length_bucketed_batches(s, lengths, 3, seed=5) for s in range(3, 6)]
    assert not torch.equal(torch.cat(later), torch.cat(first))
    # one bucket here: each batch is a run of the sorted lengths of the epoch's 9 rows
    spans = sorted((lengths[b].min().item(), lengths[b].max().item()) for b in first)
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))


def test_save_settings_are_not_part_of_the_fingerprint():
    cfg = {"lr": 1e-3, "steps": 10, "checkpoint_every": 1, "checkpoint_seconds": 30}
    same = checkpoint.fingerprint({**cfg, "checkpoint_every": 7, "checkpoint_seconds": 0}, 0, {})
    assert checkpoint.fingerprint(cfg, 0, {}) == same          # a state saved more often still resumes
    assert checkpoint.fingerprint({**cfg, "lr": 2e-3}, 0, {}) != same


def test_save_schedule_from_a_config_section(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    schedule = checkpoint.SaveSchedule.from_config({"checkpoint_every": 100, "checkpoint_seconds": 10}, default_steps=5)
    assert (schedule.every_steps, schedule.every_seconds) == (100, 10.0)
    clock[0] = 10.0
    assert schedule.due(3, World())                            # one process decides alone
    assert checkpoint.SaveSchedule.from_config({}, default_steps=5).due(5)
