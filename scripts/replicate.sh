#!/usr/bin/env bash
# The small-scale replication behind docs/results.md. Resumable: rerun it after a kill and it
# continues where it stopped (about 11 hours on 2 cores). Each config runs as two shards, one per CPU core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
SHARDS="${SHARDS:-2}"
run() {  # run one config as $SHARDS parallel shards; further arguments go to fimlora run
  local cfg="$1" out="$2"
  shift 2
  for ((i = 0; i < SHARDS; i++)); do
    .venv/bin/fimlora run "$cfg" --results "$out" --shard "$i/$SHARDS" --no-progress "$@" > "$out.shard$i.log" 2>&1 &
  done
  wait
}
mkdir -p results
run configs/small_encoder.yaml results/small_encoder
run configs/small_encoder_ablation.yaml results/small_encoder_ablation
run configs/small_encoder_aggregation.yaml results/small_encoder_aggregation
run configs/small_decoder.yaml results/small_decoder
# Same model, data and training at equal adapter size; uniform LoRA's runs are the decoder suite's (same settings).
run configs/small_decoder_params.yaml results/small_decoder_params --reuse results/small_decoder
# Beyond the paper: n_batches auto and fim_eva beside the five methods (the suites' runs are reused).
run configs/small_encoder_beyond.yaml results/small_encoder_beyond --reuse results/small_encoder
run configs/small_decoder_beyond.yaml results/small_decoder_beyond --reuse results/small_decoder
# The accuracy-size frontier against the peers (issue 22): about 35 minutes and 3.3 hours on 2 cores.
run configs/frontier_encoder.yaml results/frontier_encoder
run configs/frontier_encoder_gora_ascent.yaml results/frontier_encoder_gora_ascent  # GoRA with the code's sign
run configs/frontier_decoder.yaml results/frontier_decoder
# The fair protocol (issue 30): each method at its own learning rate, chosen on validation data (about 1.5 hours
# on 2 cores), then the recommended-learning-rate rule fitted on TREC-6's cells, judged on SST-2's.
run configs/fair_encoder.yaml results/fair_encoder
run configs/fair_encoder_sst2.yaml results/fair_encoder
.venv/bin/python benchmarks/fit_lr_rule.py --fit configs/fair_encoder.yaml --judge configs/fair_encoder_sst2.yaml \
  --results results/fair_encoder --out docs/lr_rule_fit.json --write
run configs/lr_rule_sst2.yaml results/lr_rule
# The fair protocol's decoder half (about 1 h 45 min on 2 cores), then the learning-rate rule's causal-LM constant
# fitted on SST-2's cells and judged on TREC-6 as multiple choice (grid, then training at the recommendation).
run configs/fair_decoder.yaml results/fair_decoder
run configs/fair_decoder_trec6.yaml results/fair_decoder
# Over all six methods' cells neither rule beats a fixed rate (docs/lr_rule_fit_decoder_all.json, not written); the
# constant is fitted on the adapters fimlora builds (B = 0 at init: uniform LoRA and FIM-LoRA).
.venv/bin/python benchmarks/fit_lr_rule.py --fit configs/fair_decoder.yaml --methods lora fim rslora eva pissa lora_ga \
  --results results/fair_decoder --out docs/lr_rule_fit_decoder_all.json
.venv/bin/python benchmarks/fit_lr_rule.py --fit configs/fair_decoder.yaml --methods lora fim \
  --results results/fair_decoder --out docs/lr_rule_fit_decoder.json --write
.venv/bin/python benchmarks/fit_lr_rule.py --judge-only --judge configs/fair_decoder_trec6.yaml \
  --results results/fair_decoder --out docs/lr_rule_judge_decoder_trec6.json
run configs/lr_rule_decoder_trec6.yaml results/lr_rule
# The long budget: where uniform LoRA's validation loss levels off, then the fair protocol trained that long.
run configs/long_budget_probe.yaml results/long_budget_probe
run configs/fair_encoder_long.yaml results/fair_encoder_long
run configs/fair_encoder_long_r2.yaml results/fair_encoder_long
.venv/bin/fimlora report results/small_encoder results/small_encoder_ablation results/small_encoder_aggregation \
  results/small_decoder results/small_decoder_params results/small_encoder_beyond results/small_decoder_beyond \
  results/frontier_encoder results/frontier_encoder_gora_ascent results/frontier_decoder \
  results/fair_encoder results/lr_rule results/fair_decoder results/long_budget_probe results/fair_encoder_long \
  --out docs/results.md --title "FIM-LoRA small-scale replication (CPU, real MiniLM/SmolLM2 and offline data)" \
  --preface docs/results_preface.md \
  --command "bash scripts/replicate.sh" \
  --command "# which runs, per config: fimlora run configs/<name>.yaml --results results/<name> --shard i/2 [--reuse results/<suite>]" \
  --command "fimlora report results/small_encoder results/small_encoder_ablation results/small_encoder_aggregation results/small_decoder results/small_decoder_params results/small_encoder_beyond results/small_decoder_beyond results/frontier_encoder results/frontier_encoder_gora_ascent results/frontier_decoder results/fair_encoder results/lr_rule results/fair_decoder results/long_budget_probe results/fair_encoder_long --out docs/results.md --preface docs/results_preface.md"
