"""The web console: one page, served from the node's process, over the same façade as the node.

:mod:`.server` is the HTTP and websocket server (aiohttp, on a thread of its own); :mod:`.live`
holds the frames the pages watch; ``static/`` is the page itself (plain HTML, CSS and JavaScript,
no build step). The server knows nothing of ROS: the node hands it a backend
(:class:`personal_vlm_node.ros.web.NodeConsoleBackend`) whose requests join the services' lines.
"""
