#!/usr/bin/env bash
# Run the whole test suite.
#
# As an ordinary user: in a virtualenv (./.venv, or $BBL_TEST_VENV) with the project installed.
# As root: BBL's real user is unprivileged, so the suite runs first as an unprivileged account
# ($BBL_TEST_USER, default bbltest, created if missing) from a copy of the tree and a virtualenv
# under /var/tmp/bbl-test that the account can read; then the tests marked `root` run as root.
# `--prepare-only` (as root) sets up the account, the copy and the virtualenv, and stops.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
python=${BBL_TEST_PYTHON:-/usr/bin/python3}

make_venv() {  # make_venv DIR SRC: a virtualenv with SRC and its test extras installed
    [ -x "$1/bin/python" ] || "$python" -m venv "$1"
    "$1/bin/python" -m pip install --quiet --disable-pip-version-check -e "$2[test]"
}

if [ "$(id -u)" != 0 ]; then
    venv=${BBL_TEST_VENV:-$src/.venv}
    make_venv "$venv" "$src"
    cd "$src"
    exec "$venv/bin/python" -m pytest -p no:cacheprovider tests "$@"
fi

user=${BBL_TEST_USER:-bbltest}
id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
base=/var/tmp/bbl-test
if [ -e "$base" ] && [ "$(stat -c %u "$base")" != 0 ]; then
    rm -rf "$base"  # not ours: never trust a directory someone else made
fi
mkdir -p "$base"
chmod 755 "$base"
rm -rf "$base/src"
mkdir "$base/src"
# (without __pycache__: compileall trusts a .pyc whose source has the same mtime second,
# which a checkout, a stash or a quick edit can give a changed file; Python then compiles
# it again in every process)
tar -C "$src" --exclude=./.venv --exclude=./.git --exclude='*.egg-info' \
    --exclude=__pycache__ -cf - . | tar -C "$base/src" -xf -
chmod -R a+rX "$base/src"
make_venv "$base/venv" "$base/src"
# The account cannot write __pycache__ in the copy: compile it here, or every process the
# tests start would compile BBL again (tens of milliseconds each).
"$base/venv/bin/python" -m compileall -q "$base/src/bbld" "$base/src/bblctl" "$base/src/tests" \
    >/dev/null
chmod -R a+rX "$base/venv" "$base/src"

# FUSE (AppImage mounts) and the tun device (NAT through pasta) are root-only on some
# machines; desktop systems ship /dev/fuse and /dev/net/tun 0666.
[ -c /dev/fuse ] && chmod 0666 /dev/fuse
[ -c /dev/net/tun ] && chmod 0666 /dev/net/tun

# A cgroup v2 subtree delegated to the account, as systemd's Delegate= gives one, for the
# limits tests (they skip without): $cgroup, holding no processes, with the account's test
# run started in its leaf "tests", and whichever of the pids, cpu, io and memory controllers
# cgroup v2 has here. Only where it has the pids controller.
cgroup=
cgroup2=$(awk '{ i = 7; while ($i != "-") i++ } $(i + 1) == "cgroup2" { print $5; exit }' \
    /proc/self/mountinfo)
enable_controllers() {  # enable_controllers DIR: give DIR's children what it has of ours
    for controller in pids cpu io memory; do
        grep -qw "$controller" "$1/cgroup.controllers" 2>/dev/null || continue
        grep -qw "$controller" "$1/cgroup.subtree_control" \
            || echo "+$controller" >"$1/cgroup.subtree_control" 2>/dev/null || true
    done
}
if [ -n "$cgroup2" ] && grep -qw pids "$cgroup2/cgroup.controllers" 2>/dev/null; then
    enable_controllers "$cgroup2"
fi
if [ -n "$cgroup2" ] && grep -qw pids "$cgroup2/cgroup.subtree_control" 2>/dev/null; then
    cgroup=$cgroup2/bbl-test-$user
    mkdir -p "$cgroup/tests"
    chown "$user:" "$cgroup" "$cgroup"/cgroup.procs "$cgroup"/cgroup.subtree_control \
        "$cgroup"/cgroup.threads
    chown -R "$user:" "$cgroup/tests"
    enable_controllers "$cgroup"
fi
in_cgroup() {  # in_cgroup COMMAND...: run it in $cgroup/tests when there is one
    if [ -n "$cgroup" ]; then
        sh -c 'echo $$ >"$0/tests/cgroup.procs" && exec "$@"' "$cgroup" "$@"
    else
        "$@"
    fi
}

[ "${1:-}" = "--prepare-only" ] && exit 0  # tests/bench/run.sh: the account and venv only

cd "$base/src"
status=0
in_cgroup runuser -u "$user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin \
    HOME="$(getent passwd "$user" | cut -d: -f6)" LANG=C.UTF-8 BBL_TEST_CGROUP="$cgroup" \
    "$base/venv/bin/python" -m pytest -p no:cacheprovider -m "not root" tests "$@" \
    </dev/null || status=$?
"$base/venv/bin/python" -m pytest -p no:cacheprovider -m root tests "$@" </dev/null || status=$?
exit $status
