#!/usr/bin/env bash
# Build llama.cpp's llama-server once into a cache dir, from the llama-cpp-python sdist on PyPI
# (no prebuilt binary exists on PyPI or Debian; the sdist vendors llama.cpp). ~5 min on 2 cores.
# Prints the binary's path. Skips the build when a llama-server is on PATH or already cached.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${SDG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sdg-job}"
BIN="$CACHE/llama-server-$VERSION/llama-server"
PYTHON="${PYTHON:-python3}"

if command -v llama-server >/dev/null 2>&1; then command -v llama-server; exit 0; fi
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "building llama-server $VERSION into $BIN (one time, ~5 min)" >&2
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION" >&2
tar -xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$(dirname "$BIN")"
cp "$WORK/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
