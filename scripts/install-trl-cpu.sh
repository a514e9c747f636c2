#!/usr/bin/env bash
# Install TRL with transformers and torch's CPU build once into a venv of its own, cached outside the clone, and
# convert the embedded SmolLM2 GGUF into the Hugging Face form trainers load. ~1.5 GB, ~3 min on a first run;
# instant after. For tests/test_trl.py, which trains on the job's outputs as a user would. Prints two lines: the
# venv's python, the model dir.
#   GGUF=path/to/model.gguf scripts/install-trl-cpu.sh
set -euo pipefail
VERSION="${TRL_VERSION:-1.16.0}"
CACHE="${SDG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sdg-job}"
HOME_DIR="$CACHE/trl-$VERSION"
VENV="$HOME_DIR/venv"
MODEL="$HOME_DIR/smollm2-135m-instruct"
PYTHON="${PYTHON:-python3}"
: "${GGUF:?set GGUF to the SmolLM2 .gguf file to convert}"

if [ ! -f "$VENV/.installed" ]; then
  echo "installing trl $VERSION, transformers and torch (CPU) into $VENV (one time, ~1.5 GB)" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip >&2
  # torch's +cpu build: PyPI's default torch pulls ~3 GB of CUDA libraries a CPU machine cannot use.
  "$VENV/bin/pip" install --quiet "torch==2.13.0+cpu" "trl==$VERSION" "transformers==5.24.0" gguf >&2
  "$VENV/bin/python" -c 'import trl, torch, transformers' >&2
  touch "$VENV/.installed"
fi

"$VENV/bin/python" "$(dirname "$0")/gguf-to-hf.py" "$GGUF" "$MODEL" >&2  # once: nothing to do if it is there
echo "$VENV/bin/python"
echo "$MODEL"
