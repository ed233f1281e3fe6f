"""personal_vlm_node: teach a robot your things from a few pictures, recognise them, answer about them."""

__version__ = "0.1.0"
