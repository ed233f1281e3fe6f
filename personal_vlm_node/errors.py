"""The one exception type for problems a user can cause and fix.

The ROS node turns it into ``success=false`` + message, the CLI into exit code 2 + one line.
Anything else that escapes is a bug and keeps its traceback.
"""


class PersonalVLMError(Exception):
    """A user-facing error whose message says what went wrong and what to do."""
