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
# install, as the README's first command makes.
venv=/var/tmp/bbl-test/bench-venv
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check /var/tmp/bbl-test/src
chmod -R a+rX "$venv"
user=${BBL_TEST_USER:-bbltest}
cd /var/tmp/bbl-test/src
exec runuser -u "$user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    HOME="$(getent passwd "$user" | cut -d: -f6)" \
    "$venv/bin/python" -m tests.bench.bench "$@"
