"""calibrate_trainer: the Trainer's own first batches, an optimizer that sees the resized parameters."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

import fimlora
from fimlora.integrations import calibrate_trainer
from fimlora.modules import lora_modules
from tests.references import lora_llama


class Recorder:
    """A real collator that remembers every batch it built."""

    def __init__(self):
        self.batches = []

    def __call__(self, examples):
        ids = torch.stack([e["input_ids"] for e in examples])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        self.batches.append(ids.clone())
        return batch


DRAWS = {"torch": lambda: torch.rand(3).tolist(), "random": lambda: random.random(),
         "numpy": lambda: np.random.rand(3).tolist()}


class DrawingCollator(Recorder):
    """A collator that draws from one global generator per batch, as random masking or augmentation does."""

    def __init__(self, which):
        super().__init__()
        self.which, self.draws = which, 0

    def __call__(self, examples):
        DRAWS[self.which]()
        self.draws += 1
        return super().__call__(examples)


def dataset(n=64, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 64, (seq,), generator=g)} for _ in range(n)]


def make_trainer(tmp_path, model, collator, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                             max_steps=kw.pop("max_steps", 3), report_to=[], save_strategy="no", logging_steps=1,
                             disable_tqdm=True, use_cpu=True, seed=7, remove_unused_columns=False, **kw)
    return Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collator)


def test_calibration_batches_are_the_first_training_batches_and_not_consumed(tmp_path):
    rec = Recorder()
    trainer = make_trainer(tmp_path, lora_llama(), rec)
    alloc = calibrate_trainer(trainer, n_batches=3, progress=False)
    calib = list(rec.batches)[:3]  # accelerate's DataLoaderShard builds one batch ahead
    assert len(calib) == 3
    rec.batches.clear()
    trainer.train()
    assert len(rec.batches) >= 3
    for a, b in zip(calib, rec.batches[:3]):
        assert torch.equal(a, b)
    assert (tmp_path / "rank_map.json").exists() and (tmp_path / "rank_map.png").exists()
    assert fimlora.RankAllocation.from_json(tmp_path / "rank_map.json").ranks == alloc.ranks


@pytest.mark.parametrize("which", sorted(DRAWS))
def test_calibration_restores_each_global_random_state(tmp_path, which):
    trainer = make_trainer(tmp_path, lora_llama(), DrawingCollator(which))
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    calibrate_trainer(trainer, n_batches=2, progress=False, save=False)
    assert trainer.data_collator.draws >= 2, "calibration must consume the generator for this test to mean anything"
    after_calibration = DRAWS[which]()
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    assert after_calibration == DRAWS[which]()


def test_optimizer_sees_resized_parameters_and_updates_them(tmp_path):
    model = lora_llama()
    # two steps: at B = 0 the first step leaves A untouched (its gradient is exactly zero)
    trainer = make_trainer(tmp_path, model, Recorder(), max_steps=2)
    alloc = calibrate_trainer(trainer, n_batches=2, progress=False)
    assert len(set(alloc.ranks.values())) > 1
    before = {}
    for i in lora_modules(model):
        a, b = i.layer.lora_A["default"].weight, i.layer.lora_B["default"].weight
        assert a.shape[0] == alloc.ranks[i.name] and b.shape[1] == alloc.ranks[i.name]
        before[i.name] = (a, a.detach().clone(), b, b.detach().clone())
    trainer.train()
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, (a, a0, b, b0) in before.items():
        assert id(a) in in_opt and id(b) in in_opt, name
        assert not torch.equal(b.detach(), b0), name
        assert not torch.equal(a.detach(), a0), name


def test_schedule_step_count_unaffected(tmp_path):
    lrs = []
    for calibrate in (False, True):
        trainer = make_trainer(tmp_path / str(calibrate), lora_llama(), Recorder(), max_steps=5,
                               lr_scheduler_type="linear", warmup_steps=2)
        if calibrate:
            calibrate_trainer(trainer, n_batches=4, progress=False)
        trainer.train()
        lrs.append([h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h])
        assert trainer.state.global_step == 5
    assert lrs[0] == lrs[1]


def test_gradient_accumulation_and_bf16_mixed_precision(tmp_path):
    model = lora_llama()
    model.base_model.model.gradient_checkpointing_enable()
    trainer = make_trainer(tmp_path, model, Recorder(), max_steps=2, gradient_accumulation_steps=2, bf16=True,
                           gradient_checkpointing=True)
    alloc = calibrate_trainer(trainer, n_batches=2, progress=False)
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert alloc.settings["trainer"]["gradient_accumulation_steps"] == 2


def test_existing_optimizer_is_refused(tmp_path):
    model = lora_llama()
    trainer = make_trainer(tmp_path, model, Recorder())
    trainer.create_optimizer()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="trainer: an optimizer already exists"):
        calibrate_trainer(trainer, n_batches=2, progress=False)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_rank_map_logged_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = lora_llama()
    trainer = make_trainer(tmp_path, model, Recorder(), max_steps=1)
    trainer.args.report_to = ["tensorboard"]
    from transformers.integrations import TensorBoardCallback

    trainer.add_callback(TensorBoardCallback())
    calibrate_trainer(trainer, n_batches=2, progress=False)
    trainer.train()
    logger = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "RankMapLoggerCallback")
    assert "tensorboard" in logger.logged
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "fimlora/rank_map" in tags["images"]
    assert any(t.startswith("fimlora/rank_map") for t in tags["tensors"])  # the text table


def test_single_process_under_accelerate_cpu_is_announced(monkeypatch):
    from fimlora.integrations import warn_if_single_cpu_process

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.warns(UserWarning, match=r"single process under `accelerate launch --cpu`.*--multi_gpu"):
        assert warn_if_single_cpu_process(1)
    assert not warn_if_single_cpu_process(2)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert not warn_if_single_cpu_process(1)


def test_params_budget_with_dropped_modules_trains_and_saves(tmp_path):
    """budget_unit/budget_fraction/r_min=0 through the Trainer integration (issue 13, 2-3)."""
    import json

    model = lora_llama(seed=3, r=8, target_modules="all-linear")
    full = sum(i.r * (i.in_features + i.out_features) for i in lora_modules(model))
    trainer = make_trainer(tmp_path, model, Recorder(), max_steps=2)
    alloc = calibrate_trainer(trainer, n_batches=2, progress=False, budget_unit="params", budget_fraction=0.5,
                              r_min=0)
    dropped = {n for n, r in alloc.ranks.items() if r == 0}
    assert dropped and alloc.budget == full // 2 and alloc.params_spent <= alloc.budget
    trainer.train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == alloc.params_spent
    assert not [n for n in trained if any(f"{d}." in n for d in dropped)]
    saved = json.loads((tmp_path / "rank_map.json").read_text())
    assert saved["budget_unit"] == "params" and saved["params_spent"] == alloc.params_spent


def test_learning_rate_is_reported_and_replaces_the_trainers_only_when_asked(tmp_path, monkeypatch, caplog):
    import copy as _copy

    import fimlora.config as config
    from fimlora.config import lr_rule_table

    # Not fitted: asked or not, the trainer keeps its learning rate; asked, a warning says why.
    unfitted = _copy.deepcopy(lr_rule_table())
    unfitted["rules"]["hessian"]["causal_lm"]["constant"] = None
    monkeypatch.setattr(config, "lr_rule_table", lambda: unfitted)
    trainer = make_trainer(tmp_path / "a", lora_llama(), Recorder())
    with caplog.at_level("INFO", logger="fimlora"):
        alloc = calibrate_trainer(trainer, n_batches=2, progress=False, save=False, use_learning_rate=True)
    assert alloc.lr["statistic"] > 0 and alloc.learning_rate is None and trainer.args.learning_rate == 1e-2
    assert any(r.levelname == "WARNING" and "no recommended learning rate" in r.message for r in caplog.records)
    assert alloc.settings["trainer"]["learning_rate_from"] == "trainer"
    fitted = _copy.deepcopy(lr_rule_table())
    fitted["rules"]["hessian"]["causal_lm"]["constant"] = 0.5
    monkeypatch.setattr(config, "lr_rule_table", lambda: fitted)
    trainer = make_trainer(tmp_path / "b", lora_llama(), Recorder())
    alloc = calibrate_trainer(trainer, n_batches=2, progress=False, save=False)
    assert alloc.learning_rate == pytest.approx(0.5 / alloc.lr["statistic"]) and trainer.args.learning_rate == 1e-2
    trainer = make_trainer(tmp_path / "c", lora_llama(), Recorder(), max_steps=1)
    alloc = calibrate_trainer(trainer, n_batches=2, progress=False, use_learning_rate=True)
    assert trainer.args.learning_rate == alloc.learning_rate != 1e-2
    saved = fimlora.RankAllocation.from_json(tmp_path / "c" / "rank_map.json").settings["trainer"]
    assert saved["learning_rate"] == alloc.learning_rate and saved["learning_rate_from"] == "fimlora"
    trainer.train()
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(alloc.learning_rate)
    with pytest.raises(ValueError, match="use_learning_rate: must be true or false, got 'yes'"):
        calibrate_trainer(make_trainer(tmp_path / "d", lora_llama(), Recorder()), use_learning_rate="yes")
