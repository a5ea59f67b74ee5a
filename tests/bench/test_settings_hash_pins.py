"""Settings hashes pinned from the code before the method registry (issue 29): a finished result is reused only
when its recorded hash equals the one the code computes now, so a refactor that changed a hashed dict would make
every recorded result stale."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import pytest

from fimlora.bench.config import expand_runs, load_config, run_settings_hash

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# One run of each method of configs/frontier_encoder.yaml (and a FIM variant), as computed by the original code.
FRONTIER_ENCODER = {
    "sst2__eva__r1__s1337": "0632af0e1bc41ff8",
    "sst2__fim__r1__s1337": "f5390701a7e82d33",
    "sst2__fim__r1__s1337__budget_fraction0.25__r_min0": "6d7392cc38d995af",
    "sst2__fim_gora__r1__s1337": "445d571230fb8568",
    "sst2__fim_pissa__r1__s1337": "78a40e6ca2de725a",
    "sst2__fim_rslora__r1__s1337": "c7612e40dddbfd7f",
    "sst2__gora__r1__s1337": "275c25429a6168c5",
    "sst2__lora__r1__s1337": "d64c9fd989f44e69",
    "sst2__lora_ga__r1__s1337": "1270e56db060681c",
    "sst2__pissa__r1__s1337": "d13b7f95262fd572",
    "sst2__random__r1__s1337": "d531496349959c6a",
    "sst2__rslora__r1__s1337": "f72cd27cd73bc099",
}
# Every config's whole grid: (runs, sha256[:16] of its runs' hashes joined in run-id order).
GRIDS = {
    "frontier_decoder.yaml": (120, "6e18eb81615c9166"),
    "frontier_encoder.yaml": (312, "4539ea5a980940b2"),
    "frontier_encoder_gora_ascent.yaml": (24, "78e8482f751d9236"),
    "small_decoder.yaml": (30, "62d3ea7783769dc9"),
    "small_decoder_beyond.yaml": (42, "f120b7f866b4852e"),
    "small_decoder_params.yaml": (24, "9aad3b813b91965d"),
    "small_encoder.yaml": (90, "98dbdb2e3bed191d"),
    "small_encoder_ablation.yaml": (45, "ecf54679069447ad"),
    "small_encoder_aggregation.yaml": (9, "881172db21802a01"),
    "small_encoder_beyond.yaml": (126, "4596cc8f7132590e"),
}


def test_frontier_encoder_runs_keep_their_settings_hashes():
    cfg = load_config(CONFIGS / "frontier_encoder.yaml")
    hashes = {run.run_id: run_settings_hash(asdict(cfg), run) for run in expand_runs(cfg)}
    assert {run_id: hashes[run_id] for run_id in FRONTIER_ENCODER} == FRONTIER_ENCODER


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_every_config_grid_keeps_its_settings_hashes(name):
    cfg = load_config(CONFIGS / name)
    runs = expand_runs(cfg)
    digest = hashlib.sha256("".join(run_settings_hash(asdict(cfg), run) for run in runs).encode()).hexdigest()[:16]
    assert (len(runs), digest) == GRIDS[name]
