#!/usr/bin/env bash
# The benchmarks (not part of the test suite): bash tests/bench/run.sh [ROUNDS]
# Installs Debian's bubblewrap when missing (as root), and as root runs the benchmarks as the
# unprivileged test account (BBL's real user), with the test suite's copy and virtualenv.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq bubblewrap >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
    venv=${BBL_TEST_VENV:-$src/.venv}
    [ -x "$venv/bin/python" ] || { python3 -m venv "$venv" && \
        "$venv/bin/python" -m pip install -q -e "$src"; }
    cd "$src" && exec "$venv/bin/python" -m tests.bench.bench "$@"
fi
bash "$src/tests/run.sh" --prepare-only
# Measured as users run it: the `bblctl` and `bbl-bwrap` scripts of a plain (not editable)
# install, as the README's first command makes (with a current pip: older ones write
# scripts that import re, 12 ms here, before BBL's code runs).
venv=/var/tmp/bbl-test/bench-venv
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
    /var/tmp/bbl-test/src
"$venv/bin/python" -m pip install -q --disable-pip-version-check /var/tmp/bbl-test/src
chmod -R a+rX "$venv"
user=${BBL_TEST_USER:-bbltest}
# Supervisors are not dumpable: only root reads their PSS. The benchmark asks for it through
# two FIFOs (pids in, kB out) that this root loop serves while it runs.
pss=$(mktemp -d /tmp/bbl-bench-pss.XXXXXX)
mkfifo -m 600 "$pss/ask" "$pss/answer"
chown "$user" "$pss/ask" "$pss/answer"
chmod 711 "$pss"
(
    while read -r pids < "$pss/ask" && [ "$pids" != done ]; do
        total=0
        for pid in $pids; do
            kb=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || true)
            total=$((total + ${kb:-0}))
        done
        echo "$total" > "$pss/answer"
    done
) &
reader=$!
cd /var/tmp/bbl-test/src
status=0
runuser -u "$user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    HOME="$(getent passwd "$user" | cut -d: -f6)" BBL_BENCH_PSS="$pss" \
    "$venv/bin/python" -m tests.bench.bench "$@" || status=$?
timeout 5 sh -c 'echo done > "$1/ask"' _ "$pss" || true  # (the loop may be gone)
wait "$reader" || true
rm -rf "$pss"
exit $status
