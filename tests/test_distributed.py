"""SSVI on torch.distributed: two gloo processes on the CPU, started by the test."""

import pathlib
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank, tmp, case):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save(train(rank, WORLD, case), f"{tmp}/rank{rank}.pt")
    except Exception:
        pathlib.Path(f"{tmp}/error{rank}.txt").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def train(rank, world, case):
    """12 SSVI steps on this rank's share of a 64-example data set; returns guide state, history, losses."""
    import pyro
    import pyro.distributions as pdist
    from pyro.nn import PyroModule, PyroSample

    from pyro_ssvi import SSVI, SparseSubspaceGuide

    # "trajectory": every rank (and the single process) draws the same weight noise: with weight
    # sampling a draw does not depend on the batch, so the runs must agree step by step
    pyro.set_rng_seed(100 if case == "trajectory" else 100 + rank)  # else ranks start different: SSVI makes them agree

    class Net(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc1 = PyroModule[torch.nn.Linear](8, 16)
            self.fc1.weight = PyroSample(pdist.Normal(0.0, 1.0).expand([16, 8]).to_event(2))
            self.fc2 = PyroModule[torch.nn.Linear](16, 3)
            self.fc2.weight = PyroSample(pdist.Normal(0.0, 1.0).expand([3, 16]).to_event(2))
            if case == "dense_site":  # a positive temperature: a dense site of AutoNormal's kind beside the weights
                self.temp = PyroSample(pdist.LogNormal(0.0, 0.5))

        def forward(self, x, y=None):
            logits = self.fc2(torch.relu(self.fc1(x)))
            if case == "dense_site":
                logits = logits / self.temp
            with pyro.plate("data", 64, subsample=torch.arange(x.shape[0])):
                pyro.sample("obs", pdist.Categorical(logits=logits), obs=y)
            return logits

    if case == "ddp":
        pyro.settings.set(module_local_params=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    shard = slice(rank * 64 // world, (rank + 1) * 64 // world)  # each rank its own share of the data
    model = Net()
    guide = SparseSubspaceGuide(model, density=0.5 if case == "structure" and rank == 1 else 0.3)
    if case == "nonfinite":
        pyro.enable_validation(False)  # rank 1's NaN input then reaches the loss instead of Pyro's checks
    addition = "random" if case == "random" else "gradient"
    loss = pyro.infer.Trace_ELBO()
    if case == "torch_optim":
        guide(x[:2], y[:2])
        optim = torch.optim.Adam(list(guide.parameters()) + list(model.parameters()), lr=0.01)
    elif case == "ddp":  # Pyro's own pattern: DDP around the ELBOModule, a torch optimiser
        guide(x[:2], y[:2])
        loss = torch.nn.parallel.DistributedDataParallel(pyro.infer.Trace_ELBO()(model, guide))
        optim = torch.optim.Adam(loss.parameters(), lr=0.01)
    else:
        optim = pyro.optim.Adam({"lr": 0.01})
    if case == "resumed":  # rank 0 resumed at step 10; both ranks' kernel patterns built for their own active sets
        guide(x[:2], y[:2])
        if rank == 0:
            with torch.no_grad():
                guide.ssvi_step.fill_(10)
    svi = SSVI(model, guide, optim, loss, total_steps=40 if case == "resumed" else 16, update_every=3, addition=addition, removal_fraction=0.5)
    losses = []
    for step in range(12):
        if case == "desync" and rank == 1 and step == 5:  # test-only: rank 1's active set drifts
            index = guide.active_index("fc2.weight")  # five entries, so that one update cannot undo the drift
            index[:5] = torch.tensor([i for i in range(48) if i not in set(index.tolist())][:5], dtype=index.dtype)
        xs = x[shard] * float("nan") if case == "nonfinite" and rank == 1 and step == 4 else x[shard]
        losses.append(svi.step(xs, y[shard]))
        if step == 0:  # the patterns the first step ran on describe the broadcast active sets
            stale = [n for n in ("fc1.weight", "fc2.weight") if n in guide.kernels.patterns
                     and not torch.equal(guide.kernels.patterns[n].index, guide.active_index(n).long())]
    state = {k: v.detach().clone() for k, v in guide.state_dict().items() if torch.is_tensor(v)}
    return {"state": state, "history": svi.history, "losses": losses, "step_count": svi.step_count, "stale": stale}


def _leaving_worker(rank, tmp, finished):
    import time

    from pyro_ssvi.distributed import leave_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    if rank == 0:
        time.sleep(1.0)  # rank 0 is still busy (writing a checkpoint) when rank 1 is done
        pathlib.Path(f"{tmp}/rank0_done").touch()
    leave_process_group(finished)
    left = {"initialized": dist.is_initialized(), "rank0_done": pathlib.Path(f"{tmp}/rank0_done").exists()}
    torch.save(left, f"{tmp}/left{rank}.pt")


@pytest.mark.parametrize("finished", [True, False])
def test_leave_process_group_waits_for_every_rank_only_after_a_normal_finish(tmp_path, finished):
    mp.start_processes(_leaving_worker, args=(str(tmp_path), finished), nprocs=WORLD, start_method="spawn")
    left = {r: torch.load(tmp_path / f"left{r}.pt") for r in range(WORLD)}
    assert not left[0]["initialized"] and not left[1]["initialized"]
    assert left[1]["rank0_done"] is finished  # after an error rank 1 leaves at once, without waiting for rank 0


def run(tmp_path, case):
    mp.start_processes(_worker, args=(str(tmp_path), case), nprocs=WORLD, start_method="spawn")
    errors = {r: (tmp_path / f"error{r}.txt").read_text() for r in range(WORLD) if (tmp_path / f"error{r}.txt").exists()}
    results = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD) if (tmp_path / f"rank{r}.pt").exists()}
    return results, errors


pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


@pytest.mark.parametrize("case", ["pyro_optim", "torch_optim", "ddp", "random", "trajectory", "dense_site"])
def test_ranks_keep_identical_guides_through_updates(tmp_path, case):
    results, errors = run(tmp_path, case)
    assert not errors, errors
    a, b = results[0], results[1]
    assert ("locs.temp" in a["state"]) == (case == "dense_site")
    assert [h["step"] for h in a["history"]] == [3, 6, 9]
    assert sum(sum(h["swapped"].values()) for h in a["history"]) > 0
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key  # active sets, means, scales, births
    assert a["history"] == b["history"]


@pytest.mark.determinism
def test_a_resumed_rank_0_sets_every_rank_s_step_count_and_active_sets(tmp_path):
    """The start-of-run broadcast reaches what is derived from the guide's buffers: the step count
    (read from a host copy) and the kernel patterns of the active sets rank 1 drew for itself."""
    results, errors = run(tmp_path, "resumed")
    assert not errors, errors
    a, b = results[0], results[1]
    assert a["step_count"] == b["step_count"] == 22
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [12, 15, 18, 21]
    assert a["stale"] == b["stale"] == []
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key


def test_a_desynchronised_active_set_is_detected_and_named(tmp_path):
    results, errors = run(tmp_path, "desync")
    assert set(errors) == {0, 1} and not results
    for text in errors.values():
        assert "SubspaceMismatchError: step 6: the active set of site 'fc2.weight' differs between ranks [0] vs [1]" in text


@pytest.mark.determinism
def test_two_processes_follow_the_single_process_trajectory(tmp_path):
    """Same global batch, same weight noise: the mean of the ranks' losses is the one-process loss at every step."""
    results, errors = run(tmp_path, "trajectory")
    assert not errors, errors
    import pyro

    pyro.clear_param_store()
    single = train(0, 1, "trajectory")
    two = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[1]["losses"])]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-4)
    assert [h["swapped"] for h in results[0]["history"]] == [h["swapped"] for h in single["history"]]
    for key, value in single["state"].items():
        if not value.is_floating_point():  # active sets and births: exactly
            assert torch.equal(results[0]["state"][key], value), key
        else:  # Adam moves a parameter by at most about lr (0.01) a step, however small its gradient:
            # float summation-order differences can flip a near-zero gradient's step, no more
            torch.testing.assert_close(results[0]["state"][key], value, rtol=0, atol=0.01)


def test_ranks_with_different_guides_fail_at_the_first_step_naming_the_site(tmp_path):
    results, errors = run(tmp_path, "structure")  # rank 1 built its guide with density 0.5, rank 0 with 0.3
    assert set(errors) == {0, 1} and not results
    for text in errors.values():
        assert "StructureMismatchError" in text and "site 'fc1.weight'" in text
        assert "38 of 128 entries active" in text and "64 of 128 entries active" in text and "ranks [0]" in text
        assert "all_gather_object" not in text.splitlines()[-1]


def test_a_non_finite_gradient_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    results, errors = run(tmp_path, "nonfinite")  # rank 1's loss is NaN at step 5; rank 0's is finite
    assert set(errors) == {0, 1} and not results
    for text in errors.values():
        assert "NonFiniteLossError: step 5:" in text
