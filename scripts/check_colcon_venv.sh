#!/usr/bin/env bash
# Check docs/ros.md's "Building with colcon on a ROS machine" end to end, in a scratch workspace:
# clone this repository, make a venv with --system-site-packages, pip install requirements.txt,
# colcon build, then start the node from the install space with a tiny random-weight model and
# ask it one service. Source ROS first (/opt/ros/<distro>/setup.bash, or a stand-in made with
# scripts/make_ros_standin.sh); takes a few minutes. Exit status 0 when every step passes.
#
#   scripts/check_colcon_venv.sh            # KEEP=1 keeps the workspace; PIP_ARGS adds pip options
#
# Clones the committed state (HEAD) of this repository, not uncommitted changes.
set -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Traffic stays on this machine, on a domain of its own.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${CHECK_ROS_DOMAIN_ID:-$(($$ % 90 + 10))}
READY_TIMEOUT=${READY_TIMEOUT:-300}

WS=$(mktemp -d "${TMPDIR:-/tmp}/colcon-venv-check.XXXXXX")
NODE_PID=""
FAILED=0
START=$SECONDS

say() { echo "[check] $*"; }
pass() { echo "[check] PASS: $* ($((SECONDS - STEP_START)) s)"; }
fail() {
    echo "[check] FAIL: $*"
    FAILED=1
    exit 1
}
step() {
    STEP_START=$SECONDS
    say "$*"
}
show_log() { echo "----- last lines of $1"; tail -n "${2:-40}" "$1"; echo "-----"; }

cleanup() {
    if [ -n "$NODE_PID" ] && kill -0 "$NODE_PID" 2>/dev/null; then
        kill -KILL "$NODE_PID" 2>/dev/null
        wait "$NODE_PID" 2>/dev/null
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        say "workspace kept: $WS"
    else
        rm -rf "$WS"
    fi
    if [ "$FAILED" = 0 ]; then
        say "PASS: all steps ($((SECONDS - START)) s)"
    else
        say "FAIL (logs in $WS when run with KEEP=1)"
    fi
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

say "workspace $WS, ROS_DOMAIN_ID=$ROS_DOMAIN_ID, discovery $ROS_AUTOMATIC_DISCOVERY_RANGE"

step "ROS environment"
[ -n "${ROS_DISTRO:-}" ] && [ -n "${AMENT_PREFIX_PATH:-}" ] ||
    fail "no ROS environment: source /opt/ros/<distro>/setup.bash first"
python3 -c "import rclpy" 2>"$WS/rclpy.log" || { show_log "$WS/rclpy.log" 5; fail "python3 cannot import rclpy"; }
say "ROS_DISTRO=$ROS_DISTRO, $(command -v python3) ($(python3 --version 2>&1))"
if python3 -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    say "the system python3 is externally managed (PEP 668): pip installs into it are refused"
fi
pass "python3 imports rclpy"

cd "$WS" || fail "cannot enter $WS"

step "clone the repository into src/"
git clone --quiet "$REPO" src/personal_vlm_node || fail "git clone $REPO"
say "at $(git -C src/personal_vlm_node log -1 --format='%h %s' | cut -c1-80)"
pass "cloned"

if command -v rosdep >/dev/null 2>&1; then
    step "rosdep check (install would need root; only reported)"
    if rosdep check --from-paths src --ignore-src >"$WS/rosdep.log" 2>&1; then
        say "rosdep: all system dependencies installed"
    else
        show_log "$WS/rosdep.log" 10
        say "rosdep reports missing dependencies (not a failure of this check)"
    fi
else
    say "rosdep not found: skipped"
fi

step "venv with --system-site-packages, pip install -r requirements.txt"
python3 -m venv --system-site-packages venv >"$WS/venv.log" 2>&1 || { show_log "$WS/venv.log"; fail "python3 -m venv"; }
touch venv/COLCON_IGNORE
# shellcheck disable=SC2086  # PIP_ARGS is a list of options
venv/bin/pip install --disable-pip-version-check ${PIP_ARGS:-} \
    -r src/personal_vlm_node/requirements.txt "setuptools<80" >"$WS/pip.log" 2>&1 ||
    { show_log "$WS/pip.log"; fail "pip install -r requirements.txt"; }
grep -E " requires .*, but you have " "$WS/pip.log" | sed 's/^/[check]   pip reports a conflict: /'
pass "requirements installed ($(venv/bin/python -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1))"

step "activate the venv, colcon build"
# shellcheck disable=SC1091
source venv/bin/activate
[ "$(command -v python3)" = "$WS/venv/bin/python3" ] || fail "python3 is not the venv's after activating"
python3 -m colcon build --base-paths src src/personal_vlm_node/interfaces >"$WS/colcon.log" 2>&1 ||
    { show_log "$WS/colcon.log" 60; fail "colcon build"; }
grep -E '^(Finished|Summary)' "$WS/colcon.log" | sed 's/^/[check]   /'
pass "colcon build"

step "source install/setup.bash"
# shellcheck disable=SC1091
source install/setup.bash || fail "source install/setup.bash"
NODE_EXE="$WS/install/personal_vlm_node/lib/personal_vlm_node/assistant_node"
CLI_EXE="$WS/install/personal_vlm_node/lib/personal_vlm_node/personal-vlm"
[ -x "$NODE_EXE" ] || fail "no $NODE_EXE"
[ -x "$CLI_EXE" ] || fail "no $CLI_EXE"
python3 -c "
from ament_index_python.packages import get_package_share_directory as share
import personal_vlm_interfaces.srv, personal_vlm_node
assert personal_vlm_node.__file__.startswith('$WS/install/'), personal_vlm_node.__file__
print('[check]   share:', share('personal_vlm_node'))" 2>"$WS/import.log" ||
    { show_log "$WS/import.log" 10; fail "the installed packages are not found"; }
pass "installed packages found"

step "tiny random-weight model"
python3 -m personal_vlm_node.testing.tiny_model "$WS/tiny" --family qwen2_5_vl >"$WS/tiny.log" 2>&1 ||
    { show_log "$WS/tiny.log"; fail "building the tiny model"; }
cat >"$WS/params.yaml" <<EOF
/**:
  ros__parameters:
    model: "$WS/tiny"
    device: "cpu"
    dtype: "float32"
    store_dir: "$WS/store"
    verification: false
EOF
pass "tiny model"

step "start the node from the install space (as ros2 run does)"
"$NODE_EXE" --ros-args --params-file "$WS/params.yaml" >"$WS/node.log" 2>&1 &
NODE_PID=$!
until grep -q "ready:" "$WS/node.log"; do
    kill -0 "$NODE_PID" 2>/dev/null || { show_log "$WS/node.log"; fail "the node exited before its ready line"; }
    [ $((SECONDS - STEP_START)) -lt "$READY_TIMEOUT" ] ||
        { show_log "$WS/node.log"; fail "no ready line within $READY_TIMEOUT s"; }
    sleep 1
done
say "$(grep -m1 -o 'ready:.*' "$WS/node.log")"
pass "node ready"

step "one service call: personal-vlm node list (the /list_concepts service)"
"$CLI_EXE" node --timeout 60 list --json >"$WS/list.json" 2>"$WS/list.log" ||
    { show_log "$WS/list.log" 10; show_log "$WS/node.log" 20; fail "no answer from /list_concepts"; }
python3 -c "import json, sys; assert json.load(open(sys.argv[1]))['concepts'] == []" "$WS/list.json" ||
    { cat "$WS/list.json"; fail "unexpected answer from /list_concepts"; }
say "answer: $(cat "$WS/list.json")"
pass "service answered"

step "SIGINT stops the node"
kill -INT "$NODE_PID"
for _ in $(seq 30); do
    kill -0 "$NODE_PID" 2>/dev/null || break
    sleep 1
done
kill -0 "$NODE_PID" 2>/dev/null && { show_log "$WS/node.log" 20; fail "the node still runs 30 s after SIGINT"; }
wait "$NODE_PID"
status=$?
NODE_PID=""
grep -q Traceback "$WS/node.log" && { show_log "$WS/node.log"; fail "traceback in the node's log"; }
[ "$status" = 0 ] || { show_log "$WS/node.log" 20; fail "the node exited with status $status after SIGINT"; }
pass "node stopped cleanly"
