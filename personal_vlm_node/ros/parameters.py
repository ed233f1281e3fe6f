"""The node's parameters: declared from :mod:`personal_vlm_node.settings`, checked before every
change, and applied while running through the Assistant's :meth:`configure`.

Those that pick what is loaded (model, device, dtype, store, backends …) are read-only; the live
ones are checked first by a set-parameters callback that refuses bad values with a reason.
"""

from __future__ import annotations

from ..errors import PersonalVLMError
from ..options import AssistantOptions, check_thresholds
from ..settings import ASSISTANT_LIVE, PARAMETERS, Setting, check_parameters, open_arguments, option_values


def descriptor_for(setting: Setting):
    """The ParameterDescriptor of ``setting``: description, range or choices, read-only unless live."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    lifetime = "applies while running" if setting.live else "read-only: takes effect on restart"
    descriptor = ParameterDescriptor(name=setting.name, description=f"{setting.parameter_text()} ({lifetime})",
                                     read_only=not setting.live)
    if setting.choices:
        descriptor.additional_constraints = "one of: " + ", ".join(setting.choices)
    low, high = setting.parameter_low(), setting.high
    if setting.kind is float:
        # Dynamic typing lets an integer through (`-p process_rate_hz:=5`); the set-parameters
        # callback checks that it is a number, and integers are stored as floats.
        descriptor.dynamic_typing = True
        descriptor.additional_constraints = "a number (integers accepted)"
        if low is not None:
            descriptor.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(high))]
    else:
        descriptor.type = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                           str: ParameterType.PARAMETER_STRING}[setting.kind]
        if low is not None:
            descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=1)]
    return descriptor


def _declare(node) -> None:
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
    from rclpy.parameter import Parameter

    for name, setting in PARAMETERS.items():
        try:
            node.declare_parameter(name, setting.default, descriptor_for(setting))
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            raise PersonalVLMError(f"invalid parameter {name}: {exc}") from exc
        value = node.get_parameter(name).value
        if setting.kind is float and isinstance(value, int) and not isinstance(value, bool):
            node.set_parameters([Parameter(name, Parameter.Type.DOUBLE, float(value))])


def _stored(name: str, value):
    """A parameter value as the node keeps it: integers given for a float parameter become floats."""
    return float(value) if PARAMETERS[name].kind is float else value


def _values(node) -> dict:
    values = {name: node.get_parameter(name).value for name in PARAMETERS}
    problems = check_parameters(values)
    if problems:
        raise PersonalVLMError("invalid parameters: " + "; ".join(problems))
    return {n: _stored(n, v) for n, v in values.items()}


def assistant_options(values: dict) -> AssistantOptions:
    """The assistant's options from the parameters; a negative or empty one keeps the default or
    the model profile's value."""
    return AssistantOptions(**option_values(values))


def open_assistant(values: dict, log):
    """Load the model and store for these parameter values."""
    from ..assistant import Assistant

    # A robot restarted while its fleet library's server is out of reach starts from its offline copy.
    return Assistant.open(**open_arguments(values), progress=lambda m: log.info(m),
                          warn_to=lambda m: log.warning(m), options=assistant_options(values), start_offline=True)


def start_calibration(assistant, log) -> None:
    """Say where the profile's calibration stands; measure what it lacks in the background when
    ``auto_calibrate`` is on (the node serves with the profile's defaults meanwhile)."""
    status = assistant.calibration_status()
    if status["state"] == "calibrated":
        log.info(f"profile: {status['text']}")
    elif assistant.options.auto_calibrate:
        log.warning(f"profile: {status['text']}; calibrating it once on the built-in synthetic world, in the "
                    "background (progress in /diagnostics; auto_calibrate: false turns this off)")
        assistant.calibrate_in_background(log=log.info)
    else:
        log.warning(f"profile: {status['text']} (auto_calibrate is false; `personal-vlm calibrate --auto` "
                    "measures it)")


class NodeParameters:
    """The node's parameters: declared once, checked before every change, applied while running.

    ``values`` is the one dict the rest of the node reads. A change of a live parameter is checked
    by ``_check`` (ROS refuses it with the reason when that returns one; read-only parameters are
    refused by ROS itself) and then handed to the Assistant / the front end by ``_apply``.
    """

    def __init__(self, node):
        self.node = node
        _declare(node)
        self.values = _values(node)
        self.assistant = None       # set while a model is loaded
        self.frontend = None        # set while serving
        node.add_pre_set_parameters_callback(self._floats)
        node.add_on_set_parameters_callback(self._check)
        node.add_post_set_parameters_callback(self._apply)

    def _floats(self, parameters):
        """Integers given for float parameters become floats, so the stored type stays double."""
        from rclpy.parameter import Parameter

        out = []
        for p in parameters:
            setting = PARAMETERS.get(p.name)
            if setting is not None and setting.kind is float and p.type_ == Parameter.Type.INTEGER:
                p = Parameter(p.name, Parameter.Type.DOUBLE, float(p.value))
            out.append(p)
        return out

    def _check(self, parameters):
        from rcl_interfaces.msg import SetParametersResult

        proposed = dict(self.values)
        for p in parameters:
            if p.name not in PARAMETERS:
                continue
            problem = PARAMETERS[p.name].parameter_problem(p.value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
            proposed[p.name] = p.value
        problem = None
        assistant = self.assistant
        if assistant is not None:
            # The Assistant knows its profile: a negative threshold is checked as the profile's.
            try:
                assistant.configuration_after(**{n: proposed[n] for n in ASSISTANT_LIVE})
            except PersonalVLMError as exc:
                problem = str(exc)
        elif proposed["accept_threshold"] >= 0 and proposed["reject_threshold"] >= 0:
            problem = check_thresholds(proposed["accept_threshold"], proposed["reject_threshold"])
        return SetParametersResult(successful=problem is None, reason=problem or "")

    def _apply(self, parameters) -> None:
        changed = {p.name: _stored(p.name, p.value) for p in parameters if p.name in PARAMETERS}
        self.values.update(changed)
        assistant = self.assistant
        try:
            live = {n: self.values[n] for n in ASSISTANT_LIVE if n in changed}
            if assistant is not None and live:
                assistant.configure(**live)
            if self.frontend is not None and "process_rate_hz" in changed:
                self.frontend.set_rate(self.values["process_rate_hz"])
        except PersonalVLMError as exc:      # checked before, so this is a bug, but keep running
            self.node.get_logger().error(f"parameter change not applied: {exc}")
            return
        names = sorted(n for n in changed if PARAMETERS[n].live)
        if names and (assistant is not None or self.frontend is not None):
            self.node.get_logger().info("now " + ", ".join(f"{n} = {self.values[n]}" for n in names))


def settings_line(assistant) -> str:
    """The live settings in force, the profile's included where no parameter sets them."""
    def shown(value) -> str:
        return str(value).lower() if isinstance(value, bool) else f"{value:g}"

    return "settings: " + ", ".join(f"{n} = {shown(v)}" for n, v in assistant.configuration().items())
