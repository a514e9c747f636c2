#!/usr/bin/env bash
# One line per install stage instead of pages of pip and cmake: the command's whole output goes to a log file, the
# terminal gets what is being done, its progress (cmake's and ninja's [ NN%] lines) and how long it took, or, if it
# fails, the log's last lines and where the rest is.
#
#   scripts/stage.sh "installing sdg-job and its dependencies" .logs/pip.log pip install -e .
set -uo pipefail
what="$1" log="$2"
shift 2
mkdir -p "$(dirname "$log")"
started=$SECONDS
"$@" >"$log" 2>&1 &
pid=$!
shown=""
while kill -0 "$pid" 2>/dev/null; do
  sleep 2
  pct="$(grep -aoE '^\[ *[0-9]+%\]' "$log" 2>/dev/null | tail -1 | tr -dc '0-9')"
  if [[ -t 1 ]]; then
    printf '\r==> %s … %ss%s' "$what" "$((SECONDS - started))" "${pct:+ (build ${pct}%)}"
  elif [[ -n "$pct" && "$pct" != "$shown" && $((pct / 25)) != $((${shown:-0} / 25)) ]]; then
    echo "==> $what … build ${pct}%"  # a log file or CI: a line every quarter, not a line every 2 s
  fi
  [[ -n "$pct" ]] && shown="$pct"
done
wait "$pid"
status=$?
[[ -t 1 ]] && printf '\r\033[K'
if ((status != 0)); then
  echo "==> $what: FAILED (exit $status) after $((SECONDS - started))s; the last lines of $log:" >&2
  tail -n 25 "$log" >&2
  exit "$status"
fi
echo "==> $what: done in $((SECONDS - started))s"
