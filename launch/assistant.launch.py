"""Start the personal VLM assistant node.

    ros2 launch personal_vlm_node assistant.launch.py image:=/my_camera/image_raw
    ros2 launch personal_vlm_node assistant.launch.py device:=cpu dtype:=float32 process_rate_hz:=5
    ros2 launch personal_vlm_node assistant.launch.py model:=Qwen/Qwen2.5-VL-7B-Instruct \
        params_file:=/path/to/my_assistant.yaml namespace:=robot1
    ros2 launch personal_vlm_node assistant.launch.py lifecycle:=true autostart:=false

Every node parameter is also a launch argument; an empty one (the default) keeps the params
file's value. `ros2 launch personal_vlm_node assistant.launch.py --show-args` lists them.
"""

import os

from personal_vlm_node.settings import PARAMETERS

# Every node parameter is a launch argument: name -> (type, description), from the one spec of
# the settings. The launch packages are imported where they are used, so that tests can read this
# table without them.
PARAMETER_ARGUMENTS = {
    name: (setting.kind, setting.parameter_text()
           + (": " + ", ".join(map(str, setting.choices)) if setting.choices else "")
           + (": true or false" if setting.kind is bool else "")
           + (f" (in {setting.range_text()})" if setting.range_text() else ""))
    for name, setting in PARAMETERS.items()
}
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _typed(name, text, kind):
    """A launch argument's text as the parameter's type; a clear error for what does not fit."""
    if kind is str:
        return text
    if kind is bool:
        if text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise RuntimeError(f"launch argument {name}:={text} must be true or false")
    try:
        return kind(text)
    except ValueError:
        raise RuntimeError(
            f"launch argument {name}:={text} must be {'a number' if kind is float else 'a whole number'}"
        ) from None


def _flag(context, name):
    from launch.substitutions import LaunchConfiguration

    return _typed(name, LaunchConfiguration(name).perform(context), bool)


def _assistant_node(context):
    import lifecycle_msgs.msg
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch.events import matches_action
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import LifecycleNode, Node
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState

    overrides = {}
    for name, (kind, _) in PARAMETER_ARGUMENTS.items():
        text = LaunchConfiguration(name).perform(context)
        if text != "":
            overrides[name] = _typed(name, text, kind)
    # An empty argument keeps whatever the params file says; a dict listed later overrides it.
    parameters = [LaunchConfiguration("params_file").perform(context)]
    if overrides:
        parameters.append(overrides)
    common = dict(
        package="personal_vlm_node",
        name="personal_vlm",
        namespace=LaunchConfiguration("namespace").perform(context),
        parameters=parameters,
        remappings=[("image", LaunchConfiguration("image").perform(context))],
        ros_arguments=["--log-level", LaunchConfiguration("log_level").perform(context)],
        output="screen",
        emulate_tty=True,
    )
    if not _flag(context, "lifecycle"):
        return [Node(executable="assistant_node", **common)]

    node = LifecycleNode(executable="assistant_lifecycle_node", **common)
    if not _flag(context, "autostart"):
        return [node]

    def transition(transition_id):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                           transition_id=transition_id))

    return [
        # Activate once configure has loaded the model.
        RegisterEventHandler(OnStateTransition(
            target_lifecycle_node=node, goal_state="inactive",
            entities=[transition(lifecycle_msgs.msg.Transition.TRANSITION_ACTIVATE)])),
        node,
        transition(lifecycle_msgs.msg.Transition.TRANSITION_CONFIGURE),
    ]


def generate_launch_description():
    from ament_index_python.packages import get_package_share_directory
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    default_params = os.path.join(
        get_package_share_directory("personal_vlm_node"), "config", "assistant.yaml"
    )
    arguments = [
        DeclareLaunchArgument(
            "image",
            default_value="/camera/image_raw",
            description="Camera topic that the node's `image` input is remapped to "
                        "(with image_transport:=compressed the node reads <image>/compressed)",
        ),
        DeclareLaunchArgument(
            "params_file",
            default_value=default_params,
            description="ROS parameters file for the node; the arguments below override it",
        ),
        DeclareLaunchArgument(
            "namespace",
            default_value="",
            description="Namespace for the node, its topics, services and action",
        ),
        DeclareLaunchArgument(
            "lifecycle",
            default_value="false",
            choices=["true", "false"],
            description="Start the managed (lifecycle) node, assistant_lifecycle_node, instead",
        ),
        DeclareLaunchArgument(
            "autostart",
            default_value="true",
            choices=["true", "false"],
            description="With lifecycle:=true, configure and activate the node at once "
                        "(false: leave it unconfigured for a lifecycle manager)",
        ),
        DeclareLaunchArgument(
            "log_level",
            default_value="info",
            choices=["debug", "info", "warn", "error", "fatal"],
            description="Logging level of the node",
        ),
    ]
    arguments += [
        DeclareLaunchArgument(name, default_value="",
                              description=f"{description}; empty = the params file's value")
        for name, (_, description) in PARAMETER_ARGUMENTS.items()
    ]
    return LaunchDescription(arguments + [OpaqueFunction(function=_assistant_node)])
