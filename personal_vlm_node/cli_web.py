"""``personal-vlm web``: the node with its web console on (:mod:`personal_vlm_node.web`).

It starts the ROS node in this process with ``web_port`` / ``web_host`` / ``web_token`` set, so
the page shows that node's camera; ROS arguments after ``--ros-args`` go to the node as they
would to ``assistant_node`` (remap the camera, give a params file, set parameters).
"""

from __future__ import annotations

import argparse
import os

from .errors import PersonalVLMError
from .options import DEFAULT_MODEL

DEFAULT_PORT = 8080
TOKEN_ENV = "PERSONAL_VLM_WEB_TOKEN"


def add_web_parser(sub, parser_class) -> None:
    web = sub.add_parser(
        "web", help="run the node with its web console: live view, teach by drawing a box, library, ask",
        description="Run the node (needs rclpy) with its web console on http://HOST:PORT/. Anything after "
                    "--ros-args goes to the node, e.g. --ros-args -r image:=/camera/image_raw "
                    "--params-file config/assistant.yaml (the options here win over the params file)")
    web.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    web.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: 127.0.0.1, this machine only; anything else opens the "
                          "console to the network: give --token)")
    web.add_argument("--token", default=None,
                     help=f"every request must carry this token (open http://HOST:PORT/?token=…); default: "
                          f"${TOKEN_ENV}, else none")
    web.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=[],
                     help="everything after it goes to the node as ROS arguments (-r image:=/camera/image_raw, "
                          "--params-file FILE, -p name:=value)")


def node_arguments(args) -> list[str]:
    """The node's command line for ``personal-vlm web``: the user's ROS arguments, then the console's
    parameters and the global options given (which win over a params file)."""
    if not 1 <= args.port <= 65535:
        raise PersonalVLMError(f"--port must lie in [1, 65535], got {args.port}")
    if not args.host.strip():
        raise PersonalVLMError("--host must name an address, e.g. 127.0.0.1")
    extra = list(args.ros_args)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    parameters = {"web_port": args.port, "web_host": args.host, "web_token": token}
    if args.model != DEFAULT_MODEL:
        parameters["model"] = args.model
    for option, name in (("device", "device"), ("dtype", "dtype")):
        if getattr(args, option) != "auto":
            parameters[name] = getattr(args, option)
    for option, name in (("store", "store_dir"), ("profile", "profile")):
        if getattr(args, option):
            parameters[name] = getattr(args, option)
    overrides = []
    for name, value in parameters.items():
        if value != "":             # an empty token is the parameter's default
            overrides += ["-p", f"{name}:={value}"]
    return ["personal-vlm", "--ros-args", *extra, *overrides]


def _cmd_web(args) -> None:
    argv = node_arguments(args)
    try:
        import aiohttp  # noqa: F401
        import personal_vlm_interfaces  # noqa: F401
        import rclpy  # noqa: F401
    except ImportError as exc:
        raise PersonalVLMError(f"`personal-vlm web` runs the ROS node with its console and needs rclpy, the "
                               f"personal_vlm_interfaces types and aiohttp ({exc}); run it in the quick start's "
                               ".venv or a sourced ROS workspace") from exc
    from .ros.node import main as node_main

    code = node_main(argv)
    if code:
        raise SystemExit(code)
