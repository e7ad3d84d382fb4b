"""Branch training on two processes (Gloo, CPU) against one process, resume under two processes, and
the errors of a distributed run. The test starts the two ranks itself (spawned interpreters that
join a group on a free local port, as torchrun's environment would describe it); one spawn runs
every two-process scenario in turn (two interpreter start-ups in all): about 16 s on this
repository's 2-core machine when it is quiet, most of it starting the two interpreters."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from helpers import StopAfter  # Ctrl-C right after epoch n was saved (here on every rank)
from pteenet import AttachConfig, attach, load_checkpoint, save_checkpoint
from pteenet.data import DataConfig, DataRequest
from pteenet.distributed import ALONE, Group, ShardBatches, eval_rows, gather_rows, train_rows
from pteenet.errors import PteenetError
from pteenet.progress import Sink, Task
from pteenet.sweep import SweepConfig, sweep_threshold
from pteenet.training.run import TrainConfig, train_branches

# Tolerance. The two-process run adds the same per-sample terms in another order (each rank sums its
# half, the all-reduce adds the halves), so gradients differ by rounding. Adam divides each update by
# the root of the squared gradients, so a weight whose gradient is itself at rounding level can move
# by up to a whole step (lr) either way: the hard bound is 2 * lr per step, 0.16 over the 8 steps,
# which says nothing on weights of about 0.1. The bound used is what is measured, with room: one step
# (lr). Measured over two initialisations: at most 6e-5 in one (this test's; 3.3e-5 with torch 2.14.1); in the
# other 29 of 131,072 weights of one layer beyond 1e-3 (at most 7e-3), everything else below 6e-4.
# Hence: every value within ADAM_BOUND, and at most 0.1% of a tensor's values beyond a tenth of a
# step. A real difference (other batches, per-rank BatchNorm statistics) moves most values by a good
# part of a step.
LR = 1e-2  # 64 images, batches of 16, 2 epochs: 8 steps
ADAM_BOUND, ATOL, FRACTION = LR, LR / 10, 1e-3


def data(**kw: Any) -> DataConfig:
    return DataConfig(spec="synthetic", **{"limit": 64, "augment": False, **kw})


def cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": LR, "device": "cpu", "ensemble": True, **kw})


class DieIn(Sink):
    """Rank 1 dies (no cleanup, as under kill -9) at the first batch of epoch ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def task(self, description: str, total: int | None = None, completed: int = 0) -> Task:
        return Die() if description.startswith(f"epoch {self.n}/") and os.environ["RANK"] == "1" else Task()


class Die(Task):
    def advance(self, steps: int = 1, info: str | None = None) -> None:
        os._exit(3)


def sweep_cfg(outdir: Path, **kw: Any) -> SweepConfig:
    # MACs: compared with one process's sweep, and a time profile differs run to run
    return SweepConfig(**{"outdir": str(outdir), "max_drop": 5.0, "confidence": 0.0, "device": "cpu", "batch_size": 16,
                          "plots": False, "cost": "macs", **kw})


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        doc = fn()
        return {"ok": True, "complete": doc["final"]["complete"]}
    except PteenetError as e:
        return {"ok": False, "type": type(e).__name__, "message": str(e)}


def _rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", PTEENET_DIST_TIMEOUT_MIN="1")
    torch.set_num_threads(1)
    d, ck = Path(folder), Path(folder) / "attached.safetensors"
    results: dict[str, Any] = {}

    def save() -> None:
        (d / f"rank{rank}.json").write_text(json.dumps(results))

    results["straight"] = _outcome(lambda: train_branches(ck, d / "straight2.safetensors", data(), cfg()))
    results["stop"] = _outcome(lambda: train_branches(ck, d / "split2.safetensors", data(), cfg(), StopAfter(1)))
    if rank == 0:
        shutil.copy(d / "split2.safetensors", d / "half2.safetensors")
    results["resume"] = _outcome(lambda: train_branches(ck, d / "split2.safetensors", data(), cfg(resume=True)))
    # The same with augmentation, the only user of each rank's own RNG stream (restore_rank_rng).
    aug = data(augment=True)
    results["aug_straight"] = _outcome(lambda: train_branches(ck, d / "aug_straight2.safetensors", aug, cfg()))
    results["aug_stop"] = _outcome(lambda: train_branches(ck, d / "aug_split2.safetensors", aug, cfg(), StopAfter(1)))
    results["aug_resume"] = _outcome(lambda: train_branches(ck, d / "aug_split2.safetensors", aug, cfg(resume=True)))
    results["cached"] = _outcome(lambda: train_branches(ck, d / "cached2.safetensors", data(),
                                                        cfg(cache_features=True, cache_dir=str(d / "features"))))
    results["too_few"] = _outcome(lambda: train_branches(ck, d / "few.safetensors", data(limit=1), cfg()))
    results["uneven"] = _outcome(lambda: train_branches(ck, d / "uneven.safetensors", data(), cfg(batch_size=15)))
    results["sweep"] = _outcome(lambda: {"final": {"complete": True}, **sweep_threshold(
        d / "straight2.safetensors", DataRequest(), sweep_cfg(d / "sweep2"))})
    # The defaults (time priced, the guarantee, exit selection): every rank must take rank 0's choice.
    doc = sweep_threshold(d / "straight2.safetensors", DataRequest(), SweepConfig(
        max_drop=50.0, select_exits=True, device="cpu", batch_size=16, plots=False))
    results["sweep_defaults"] = {k: doc[k] for k in ("chosen", "guarantee", "cost_model")}
    save()
    results["died"] = _outcome(lambda: train_branches(ck, d / "died.safetensors", data(), cfg(epochs=3), DieIn(2)))
    save()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)  # the same branches whichever tests ran before
    save_checkpoint(folder / "attached.safetensors",
                    attach(AttachConfig(backbone="cifar-resnet20", input_size=(3, 16, 16), exits=2)))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(folder))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
    # Rank 1 died on purpose at the end. Rank 0 reported that and wrote its results; Gloo may still
    # abort it at exit (SIGABRT, "terminate called without an active exception") now and then.
    assert procs[0].exitcode in (0, -6) and procs[1].exitcode == 3
    return folder, [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def branches(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("branches.", "ensemble."))}


def test_two_processes_train_the_branches_one_process_would(two_ranks: Any, tmp_path: Path) -> None:
    folder, res = two_ranks
    assert res[0]["straight"] == res[1]["straight"] == {"ok": True, "complete": True}
    one = tmp_path / "one.safetensors"
    train_branches(folder / "attached.safetensors", one, data(), cfg())
    a, b = branches(one), branches(folder / "straight2.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("ensemble.") for k in a)
    for k in a:
        diff = (a[k].float() - b[k].float()).abs()
        assert float(diff.max()) <= ADAM_BOUND and float((diff > ATOL).float().mean()) <= FRACTION, k
    two = load_checkpoint(folder / "straight2.safetensors").model
    assert two.meta["training"]["world_size"] == 2
    # the backbone was never in DDP: bit-identical to the attached one
    src = load_checkpoint(folder / "attached.safetensors").model
    assert all(torch.equal(v, two.backbone.state_dict()[k]) for k, v in src.backbone.state_dict().items())
    # the per-epoch record is the whole split's, not rank 0's half
    ref = load_checkpoint(one).model.meta["history"]
    assert [h["val"]["samples"] for h in two.meta["history"]] == [h["val"]["samples"] for h in ref]
    assert abs(two.meta["history"][-1]["train"]["loss"] - ref[-1]["train"]["loss"]) < 1e-4


def test_resume_under_two_processes_equals_the_uninterrupted_run(two_ranks: Any) -> None:
    folder, res = two_ranks
    assert all(r["stop"]["type"] == "Interrupted" and "holds epoch 1" in r["stop"]["message"] for r in res)
    assert res[0]["resume"] == {"ok": True, "complete": True}
    a, b = branches(folder / "straight2.safetensors"), branches(folder / "split2.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # each rank's RNG was saved for the resume
    assert "rng.cpu.rank1" in load_checkpoint(folder / "half2.safetensors").state


def test_resume_with_augmentation_restores_every_ranks_random_stream(two_ranks: Any) -> None:
    folder, res = two_ranks
    assert all(r["aug_stop"]["type"] == "Interrupted" for r in res)
    assert res[0]["aug_straight"] == res[0]["aug_resume"] == {"ok": True, "complete": True}
    a, b = branches(folder / "aug_straight2.safetensors"), branches(folder / "aug_split2.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = branches(folder / "straight2.safetensors")  # augmentation really changed what was trained
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_resume_with_another_number_of_processes_is_refused(two_ranks: Any) -> None:
    folder, _ = two_ranks
    half = folder / "half2.safetensors"
    before = half.read_bytes()
    with pytest.raises(PteenetError, match="ran on 2 processes.*nproc_per_node 2"):
        train_branches(folder / "attached.safetensors", half, data(), cfg(resume=True))
    assert half.read_bytes() == before


def test_feature_cache_is_sharded_per_rank(two_ranks: Any) -> None:
    folder, res = two_ranks
    assert res[0]["cached"] == {"ok": True, "complete": True}
    # one cache file per rank and split: each rank cached its own shard
    assert len(list((folder / "features").glob("features-*.safetensors"))) == 4


def test_bad_input_stops_every_rank_with_one_error(two_ranks: Any) -> None:
    folder, res = two_ranks
    assert res[0]["too_few"]["type"] == "PteenetError" and "2 processes but only 1 training image:" in res[0]["too_few"]["message"]
    assert res[0]["uneven"]["type"] == "PteenetError" and "does not split evenly over 2" in res[0]["uneven"]["message"]
    assert res[1]["too_few"]["type"] == res[1]["uneven"]["type"] == "OtherRankFailed"  # the CLI prints it once
    assert not (folder / "few.safetensors").exists() and not (folder / "uneven.safetensors").exists()


def test_a_rank_that_dies_leaves_the_last_complete_epoch(two_ranks: Any) -> None:
    folder, res = two_ranks
    assert res[0]["died"]["ok"] is False and "lost contact" in res[0]["died"]["message"]
    assert "holds epoch 1" in res[0]["died"]["message"]
    ck = load_checkpoint(folder / "died.safetensors")
    assert ck.model.meta["training"]["epochs_done"] == 1 and int(ck.state["epoch"]) == 1
    assert not list(folder.glob(".died*.tmp"))


def test_the_sweeps_cache_pass_sharded_gives_the_single_process_sweep(two_ranks: Any, tmp_path: Path) -> None:
    folder, res = two_ranks
    assert res[0]["sweep"]["ok"] and res[1]["sweep"]["ok"]
    sweep_threshold(folder / "straight2.safetensors", DataRequest(), sweep_cfg(tmp_path))
    one = json.loads((tmp_path / "sweep.json").read_text())
    two = json.loads((folder / "sweep2" / "sweep.json").read_text())  # written by rank 0 alone
    assert {k: v for k, v in one.items() if k != "outdir"} == {k: v for k, v in two.items() if k != "outdir"}


def test_the_default_sweep_under_two_processes_chooses_one_setting_on_every_rank(two_ranks: Any) -> None:
    _, res = two_ranks
    a, b = res[0]["sweep_defaults"], res[1]["sweep_defaults"]
    assert a["cost_model"]["kind"] == "time" and a["guarantee"]["confidence"] == 0.9
    assert a == b  # rank 0's time profile prices every rank's points: one choice, one certificate


def test_shards_make_up_the_batches_of_one_process() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(103))
    from pteenet.data import make_loader

    for batch, shuffle in ((10, True), (200, True), (10, False)):
        drop = shuffle and 103 > batch
        alone = make_loader(ds, batch, shuffle, 0, 0, drop)
        want = [x[0].tolist() for x in alone]
        parts = []
        for r in range(2):
            s = ShardBatches(103, batch, shuffle, drop, None, Group(r, 2), even=shuffle)
            loader = make_loader(ds, batch, shuffle, 0, 0, drop, batch_sampler=s)
            s.generator = loader.generator
            parts.append([x[0].tolist() for x in loader])
            assert torch.equal(loader.generator.get_state(), alone.generator.get_state())  # resume stays exact
        merged = [sorted(a + b) for a, b in zip(*parts)]
        assert merged == [sorted(w[:len(w) - len(w) % 2] if shuffle else w) for w in want]
    assert sorted(eval_rows(103, 10, Group(0, 2)) + eval_rows(103, 10, Group(1, 2))) == list(range(103))
    assert len(train_rows(103, Group(0, 2))) == len(train_rows(103, Group(1, 2))) == 51


def test_gather_rows_alone_is_the_identity() -> None:
    x = {"a": torch.arange(4)}
    assert gather_rows([0, 1, 2, 3], x, False, ALONE, to_main_only=True) is x
