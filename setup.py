"""ament_python package personal_vlm_node; installable with colcon or with pip.

With pip (`pip install .` into a venv that has the ROS wheels), the data files below give the
venv the same layout a colcon install has, so `get_package_share_directory()` and launch_ros find
the package once AMENT_PREFIX_PATH points at the venv.
"""

import re
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "personal_vlm_node"
HERE = Path(__file__).resolve().parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / PACKAGE / "__init__.py").read_text(encoding="utf-8"), re.M
).group(1)

setup(
    name=PACKAGE,
    version=VERSION,
    description="Teach a robot your own things from a few pictures; named detections and answers.",
    packages=find_packages(exclude=["test", "test.*"]),
    # The web console's page (plain HTML, CSS, JavaScript), read with importlib.resources.
    package_data={"personal_vlm_node.web": ["static/*.html", "static/*.css", "static/*.js"]},
    python_requires=">=3.10",
    # Light dependencies only. torch is left to the user (CPU, CUDA or Jetson build);
    # requirements.txt pins the one this project is tested with. ROS packages come from the ROS
    # install or requirements-ros.txt.
    install_requires=[
        "numpy",
        "pillow",
        "pyyaml",
        "safetensors",
        "transformers>=5.0,<6",
    ],
    # The web console (`personal-vlm web`, node parameter web_port); requirements.txt pins it.
    extras_require={"web": ["aiohttp>=3.9,<4"]},
    data_files=[
        # ament index marker: makes the package discoverable by ament_index / ros2.
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", sorted(glob("launch/*.launch.py"))),
        (f"share/{PACKAGE}/config", sorted(glob("config/*.yaml"))),
        (f"share/{PACKAGE}/models", sorted(glob("models/*.yaml"))),
        # Where `ros2 run` and launch_ros look for executables (pip ignores setup.cfg's
        # install_scripts, so ship the node's launcher as data).
        (f"lib/{PACKAGE}", ["scripts/assistant_node", "scripts/assistant_lifecycle_node"]),
    ],
    zip_safe=False,
    entry_points={
        "console_scripts": [
            "personal-vlm = personal_vlm_node.cli:main",
        ],
    },
)
