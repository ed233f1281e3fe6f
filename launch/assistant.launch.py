"""Start the personal VLM assistant node.

    ros2 launch personal_vlm_node assistant.launch.py image:=/my_camera/image_raw
    ros2 launch personal_vlm_node assistant.launch.py model:=Qwen/Qwen2.5-VL-7B-Instruct \
        params_file:=/path/to/my_assistant.yaml namespace:=robot1
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _assistant_node(context):
    model = LaunchConfiguration("model").perform(context)
    parameters = [LaunchConfiguration("params_file").perform(context)]
    # An empty model keeps whatever the params file says; a dict listed later overrides it.
    if model:
        parameters.append({"model": model})
    return [
        Node(
            package="personal_vlm_node",
            executable="assistant_node",
            name="personal_vlm",
            namespace=LaunchConfiguration("namespace"),
            parameters=parameters,
            remappings=[("image", LaunchConfiguration("image"))],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description():
    default_params = os.path.join(
        get_package_share_directory("personal_vlm_node"), "config", "assistant.yaml"
    )
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "model",
                default_value="",
                description="Hugging Face model id or local folder; empty = the params file's value",
            ),
            DeclareLaunchArgument(
                "image",
                default_value="/camera/image_raw",
                description="Camera topic (sensor_msgs/Image) that the node's `image` input is remapped to",
            ),
            DeclareLaunchArgument(
                "params_file",
                default_value=default_params,
                description="ROS parameters file for the node",
            ),
            DeclareLaunchArgument(
                "namespace",
                default_value="",
                description="Namespace for the node, its topics and services",
            ),
            OpaqueFunction(function=_assistant_node),
        ]
    )
