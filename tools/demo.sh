#!/usr/bin/env bash
# Set up and run the main job on the built-in example: train a small CNN on scikit-learn's digits (real data),
# export it to ONNX, compile it for this CPU with the cleanup pipeline (verified against onnxruntime),
# print the report table, and measure the compiled library's accuracy on the held-out digits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
mkdir -p out/example
.venv/bin/python tools/make_example.py out/example/digits_cnn.onnx
.venv/bin/graphopt compile out/example/digits_cnn.onnx --target cpu --pipeline cleanup -o out/example/digits_cnn.cpu --threads 1
.venv/bin/python tools/make_example.py --evaluate out/example/digits_cnn.cpu
