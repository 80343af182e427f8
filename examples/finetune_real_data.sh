#!/bin/sh
# Fine-tune end to end on real data with the command line, as a user would:
#
# 1. stories260K (a real 260K-parameter Llama) learns wikisql's
#    question-to-SQL completions with LoRA on the float model, then with
#    QLoRA on a 4-bit copy, and the QLoRA adapter is fused.
# 2. A random-weight model with SmolLM2-135M's configuration and tokenizer
#    learns the chat_identity conversations (chat template, --mask-prompt).
#
# Each finetune prints the validation loss before training (iteration 0) and
# at the end; examples/FINETUNE_RESULTS.md records what this machine gave.
#
# Run from the repository root after `make install`:
#     sh examples/finetune_real_data.sh
# SHARED (default ../shared) holds the inputs, OUT (default
# examples_out) receives the models and adapters.
set -eu

BIN=${BIN:-.venv/bin}
SHARED=${SHARED:-../shared}
OUT=${OUT:-examples_out}
mkdir -p "$OUT"

echo "== stories260K, LoRA on wikisql"
"$BIN/mlxbastion" convert --hf-path "$SHARED/models/stories260K/hf" \
    --mlx-path "$OUT/stories260K" --force
"$BIN/mlxbastion" finetune --model "$OUT/stories260K" \
    --data "$SHARED/data/wikisql" --adapter-path "$OUT/stories260K-lora" \
    --num-layers -1 --batch-size 8 --iters 300 --learning-rate 1e-3 \
    --steps-per-report 50 --steps-per-eval 300 --val-batches -1 --force

echo "== stories260K, QLoRA (4-bit base) on wikisql, then fused"
"$BIN/mlxbastion" quantize --model "$OUT/stories260K" \
    --mlx-path "$OUT/stories260K-4bit" --bits 4 --group-size 32 --force
"$BIN/mlxbastion" finetune --model "$OUT/stories260K-4bit" \
    --data "$SHARED/data/wikisql" --adapter-path "$OUT/stories260K-qlora" \
    --num-layers -1 --batch-size 8 --iters 300 --learning-rate 1e-3 \
    --steps-per-report 50 --steps-per-eval 300 --val-batches -1 --force
"$BIN/mlxbastion" fuse --model "$OUT/stories260K-4bit" \
    --adapter-path "$OUT/stories260K-qlora" --mlx-path "$OUT/stories260K-fused" \
    --force
"$BIN/mlxbastion" generate --model "$OUT/stories260K-fused" --max-tokens 40 \
    --prompt "table: 1-10015132-16
columns: Player, No., Nationality, Position, Years in Toronto, School/Club Team
Q: What is terrence ross' nationality
A: "

echo "== random-weight SmolLM2-135M configuration, LoRA on chat_identity"
"$BIN/python" - "$OUT/smollm2-135m-random" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from suite import build_float  # random weights from benchmarks/configs

build_float("smollm2-135m", Path(sys.argv[1]))
EOF
"$BIN/mlxbastion" finetune --model "$OUT/smollm2-135m-random" \
    --data "$SHARED/data/chat_identity" --adapter-path "$OUT/smollm2-lora" \
    --mask-prompt --batch-size 4 --iters 100 --learning-rate 1e-3 \
    --steps-per-report 25 --steps-per-eval 100 --val-batches -1 --force
