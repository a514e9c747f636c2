#!/usr/bin/env bash
# Build NVIDIA enroot and pyxis (the Slurm SPANK plugin behind `srun --container-image`) from the vendored source
# tarballs, for the pyxis mode of scripts/slurm-test-cluster.sh. Neither is packaged for Debian. The build lands in a
# cache outside the clone and is reused; nothing of the vendored source is copied into the project.
#
#   scripts/build-enroot-pyxis.sh      prints the install prefix (bin/enroot, lib/slurm/spank_pyxis.so) as its last line
#
#   SDG_VENDOR_DIR  the tarballs and their SHA256SUMS (default: ../shared/vendor from the repository's root)
#   SDG_CACHE_DIR   the cache (default: ~/.cache/sdg-job); the build log goes there, not to the terminal
set -euo pipefail

ENROOT_VERSION=4.1.2
PYXIS_VERSION=0.24.0
here="$(cd "$(dirname "$0")" && pwd)"
vendor="${SDG_VENDOR_DIR:-$(realpath -m "$here/../../shared/vendor")}"
cache="${SDG_CACHE_DIR:-$HOME/.cache/sdg-job}"
name="enroot-$ENROOT_VERSION-pyxis-$PYXIS_VERSION"
prefix="$cache/$name"
log="$cache/$name.build.log"

# The prefix only ever appears by a rename of a finished install, so its existence means a complete build.
cached() { [[ -x "$prefix/bin/enroot" && -f "$prefix/lib/slurm/spank_pyxis.so" ]]; }
if cached; then echo "$prefix"; exit 0; fi

# Build and run-time dependencies (enroot's import needs jq, parallel, curl, zstd, pigz; its images mksquashfs and
# unsquashfs; use_squashfuse squashfuse). Probes are commands or files; only what is missing goes to apt.
have() { if [[ "$1" == /* ]]; then [[ -e "$1" ]]; else command -v "$1" >/dev/null; fi; }
missing=()
for probe in build-essential:gcc,make,/usr/include/stdio.h libslurm-dev:/usr/include/slurm/spank.h \
  libbsd-dev:/usr/include/bsd/string.h makeself:makeself squashfs-tools:mksquashfs,unsquashfs squashfuse:squashfuse \
  zstd:zstd pigz:pigz jq:jq gawk:gawk parallel:parallel bsdextrautils:column passwd:useradd curl:curl; do
  IFS=, read -ra need <<<"${probe#*:}"
  for n in "${need[@]}"; do have "$n" || { missing+=("${probe%%:*}"); break; }; done
done
# The package names stand in for the helper's "commands": none is on PATH, so it installs exactly these.
((${#missing[@]} == 0)) || "$here/install-debian-packages.sh" "${missing[*]}" "${missing[@]}"

mkdir -p "$cache"
exec 9>"$cache/.$name.lock"
flock 9  # a second build started meanwhile waits, then finds the cache
if cached; then echo "$prefix"; exit 0; fi

if [[ ! -f "$vendor/SHA256SUMS" ]]; then
  echo "error: no vendored enroot/pyxis sources at $vendor (a clone finds them at ../shared/vendor beside it;" \
    "elsewhere set SDG_VENDOR_DIR to the directory holding the tarballs and SHA256SUMS)" >&2
  exit 1
fi
sums="$(grep -E "  (enroot-$ENROOT_VERSION|pyxis-$PYXIS_VERSION)\.tar\.gz\$" "$vendor/SHA256SUMS" || true)"
if [[ "$(grep -c . <<<"$sums")" != 2 ]] || ! (cd "$vendor" && sha256sum --quiet --check <<<"$sums") >&2; then
  echo "error: enroot-$ENROOT_VERSION.tar.gz and pyxis-$PYXIS_VERSION.tar.gz in $vendor do not match its SHA256SUMS" >&2
  exit 1
fi

tmp="$(mktemp -d "$cache/.$name.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "building enroot $ENROOT_VERSION and pyxis $PYXIS_VERSION into $prefix (log: $log)" >&2
build() {
  set -x
  tar -C "$tmp" -xzf "$vendor/enroot-$ENROOT_VERSION.tar.gz"
  tar -C "$tmp" -xzf "$vendor/pyxis-$PYXIS_VERSION.tar.gz"
  cd "$tmp/enroot-$ENROOT_VERSION"
  # The tarball lacks enroot's git submodules (musl, linux-headers, makeself): build against glibc and the system's
  # headers, use Debian's makeself. enroot's `deps` target runs `git submodule update`: keep git off any repository
  # around the cache.
  install -m 755 -D /usr/bin/makeself deps/makeself/makeself.sh
  touch deps/linux-headers/.stamp
  mkdir -p deps/dist/linux/include
  # glibc 2.36 lacks strlcpy/strlcat: libbsd's overlay headers, and its shared library linked explicitly (a plain -lbsd
  # would find enroot's own partial libbsd.a first and fail). CPPFLAGS through the environment: on make's command line
  # it would replace enroot's own flags instead of extending them. enroot bakes the prefix into bin/enroot when it is
  # built, so build with the final prefix, install under DESTDIR, and move the result into place at the end.
  export CPPFLAGS="-isystem /usr/include/bsd -DLIBBSD_OVERLAY" GIT_DIR=/nonexistent
  make FORCE_GLIBC=1 LDLIBS="-l:libbsd.a -l:libbsd.so" prefix="$prefix" all
  make FORCE_GLIBC=1 LDLIBS="-l:libbsd.a -l:libbsd.so" prefix="$prefix" DESTDIR="$tmp/dest" install
  unset CPPFLAGS GIT_DIR
  cd "$tmp/pyxis-$PYXIS_VERSION"
  make prefix="$prefix" DESTDIR="$tmp/dest" install
  if grep -rl "$tmp" "$tmp/dest"; then echo "error: the build path got baked into the install"; exit 1; fi
  ls -l "$tmp/dest$prefix/bin" "$tmp/dest$prefix/lib/slurm"
}
set +e  # errexit is void inside an `if`, so run the build outside one, with errexit on in its subshell
(set -e; build) >"$log" 2>&1
rc=$?
set -e
if ((rc != 0)); then
  echo "error: the enroot/pyxis build failed; last lines of $log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
rm -rf "$prefix"  # an incomplete one, damaged after the fact
mv -T "$tmp/dest$prefix" "$prefix"
echo "$prefix"
