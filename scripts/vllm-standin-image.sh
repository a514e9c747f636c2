#!/usr/bin/env bash
# Local images for building and running the project's Dockerfile where no image registry is reachable (the container
# tests, tests/test_docker.py). Needs a Docker engine (DOCKER_HOST, e.g. from scripts/docker-engine.sh) and, the
# first time, root and debootstrap (installed with apt if missing).
#
#   scripts/vllm-standin-image.sh [TAG]     build both images; prints TAG (default sdg-test/vllm-standin:local)
#
# sdg-test/bookworm:local   Debian bookworm from the host's Debian mirror (`debootstrap --variant=minbase`, with
#                           python3, python3-venv and the C++/OpenMP runtimes that a mounted llama-server needs),
#                           the host's CA bundle and apt sources, PIP_CERT/SSL_CERT_FILE set (pip inside a build
#                           checks certificates against it). The debootstrap tarball is cached in
#                           ${SDG_CACHE_DIR:-~/.cache/sdg-job}/debootstrap/.
# TAG                       a stand-in for the official vLLM image: the image's own Python environment is a venv
#                           first on PATH holding a tiny, locally built package `vllm` (0.33.0+standin, with a `vllm`
#                           command) that requires mcp>=2.2,<3 as vLLM 0.33 does, so mcp 2.x is installed there.
#                           Its `vllm` prints which interpreter and mcp it runs with, then exits (no inference engine).
set -euo pipefail

tag="${1:-sdg-test/vllm-standin:local}"
base_tag="sdg-test/bookworm:local"
cache="${SDG_CACHE_DIR:-$HOME/.cache/sdg-job}/debootstrap"
packages="python3,python3-venv,libgomp1,libstdc++6"
docker=(docker)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log() { echo "vllm-standin-image: $*" >&2; }

# The host's Debian mirror (deb822 sources first, then sources.list), else Debian's own.
debian_mirror() {
  local m=""
  m="$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 || true)"
  [[ -n "$m" ]] || m="$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; break}}' \
                         /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 || true)"
  echo "${m:-http://deb.debian.org/debian}"
}

rootfs_tarball() {
  local mirror key tarball tmp
  mirror="$(debian_mirror)"
  key="$(echo "bookworm minbase $packages $mirror" | sha256sum | cut -c1-12)"
  tarball="$cache/bookworm-minbase-$key.tar.gz"
  if [[ -s "$tarball" ]]; then
    echo "$tarball"
    return
  fi
  "$(dirname "$0")/install-debian-packages.sh" debootstrap debootstrap
  mkdir -p "$cache"
  tmp="$(mktemp -d "$cache/rootfs.XXXXXX")"
  log "debootstrap --variant=minbase bookworm from $mirror (once; cached in $tarball)"
  if ! debootstrap --variant=minbase --include="$packages" bookworm "$tmp/root" "$mirror" >"$tmp/debootstrap.log" 2>&1; then
    log "error: debootstrap failed:"; tail -20 "$tmp/debootstrap.log" >&2; rm -rf "$tmp"; exit 1
  fi
  rm -rf "$tmp/root/var/lib/apt/lists/"* "$tmp/root/var/cache/apt/"*.bin "$tmp/root/var/cache/apt/archives/"*.deb
  tar -C "$tmp/root" --numeric-owner -czf "$tmp/rootfs.tar.gz" .
  mv "$tmp/rootfs.tar.gz" "$tarball"
  rm -rf "$tmp"
  echo "$tarball"
}

build_base() {
  local tarball ctx
  tarball="$(rootfs_tarball)"
  "${docker[@]}" import "$tarball" sdg-test/bookworm-rootfs:local >/dev/null
  ctx="$work/base"
  mkdir -p "$ctx/sources.list.d"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates.crt"
  [[ -f /etc/apt/sources.list ]] && cp /etc/apt/sources.list "$ctx/sources.list" || : >"$ctx/sources.list"
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] && grep -q "debian" "$f" && cp "$f" "$ctx/sources.list.d/"
  done
  cat >"$ctx/Dockerfile" <<'EOF'
FROM sdg-test/bookworm-rootfs:local
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY sources.list /etc/apt/sources.list
COPY sources.list.d/ /etc/apt/sources.list.d/
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
CMD ["/bin/bash"]
EOF
  "${docker[@]}" build --network host -t "$base_tag" "$ctx" >&2
}

build_standin() {
  local ctx
  ctx="$work/standin"
  mkdir -p "$ctx/vllm-standin/vllm"
  cat >"$ctx/vllm-standin/pyproject.toml" <<'EOF'
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "vllm"
version = "0.33.0+standin"
description = "Stand-in for vLLM in sdg-job's container tests: its dependency on mcp 2, and a `vllm` command"
dependencies = ["mcp>=2.2,<3"]

[project.scripts]
vllm = "vllm.standin:main"
EOF
  echo '__version__ = "0.33.0+standin"' >"$ctx/vllm-standin/vllm/__init__.py"
  cat >"$ctx/vllm-standin/vllm/standin.py" <<'EOF'
"""`vllm` in the stand-in image: says which environment it runs in (interpreter, mcp), then exits; no engine."""

import importlib.metadata
import os
import sys

import mcp  # noqa: F401  (importable: this environment's mcp 2.x)


def main() -> int:
    key = "set" if os.environ.get("VLLM_API_KEY") else "unset"
    print(f"vllm stand-in {importlib.metadata.version('vllm')}: python={sys.executable} "
          f"mcp={importlib.metadata.version('mcp')} VLLM_API_KEY={key} "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')} argv={sys.argv[1:]}", flush=True)
    if sys.argv[1:] == ["--version"]:
        return 0
    print("vllm stand-in: no inference engine in this test image", file=sys.stderr)
    return 3
EOF
  cat >"$ctx/Dockerfile" <<EOF
FROM $base_tag
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:\$PATH
COPY vllm-standin /tmp/vllm-standin
RUN pip install --no-cache-dir --quiet /tmp/vllm-standin && rm -rf /tmp/vllm-standin && pip check && vllm --version
EOF
  "${docker[@]}" build --network host -t "$tag" "$ctx" >&2
}

build_base
build_standin
echo "$tag"
