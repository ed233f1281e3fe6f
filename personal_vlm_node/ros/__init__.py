"""ROS 2 front end: a thin node over personal_vlm_node.assistant."""
