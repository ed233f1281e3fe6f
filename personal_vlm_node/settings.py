"""Every setting a user can choose, written once: name, type, default, range, live or not, meaning.

The ROS node's parameters and their descriptors, the launch file's arguments, the checks of
:class:`~personal_vlm_node.options.AssistantOptions` and of a model profile's shared keys,
:meth:`Assistant.configure <personal_vlm_node.assistant.Assistant.configure>` and the docs'
parameter table all come from :data:`SETTINGS`; ``test/test_settings.py`` checks that
``config/assistant.yaml`` and the docs still agree with it. Importing this module costs nothing
(no ROS, no torch).

``python -m personal_vlm_node.settings --markdown`` prints the parameter table for the docs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PersonalVLMError
from .options import (DEFAULT_MODEL, DEFAULT_VERIFIER, DTYPES, ENCODER_CHOICES, RECOGNITION_METHODS, SIGLIP_VERIFIER,
                      check_thresholds)

# The node's word for "the model profile's value": negative, as a ROS parameter cannot be unset.
USE_PROFILE = -1
MAX_WAITING_REQUESTS = 16          # the parameter's upper bound: each waiting request holds a thread


@dataclass(frozen=True)
class Setting:
    """One setting and every place it appears.

    ``default`` is the node parameter's default, or the option's when the setting is no node
    parameter. ``follows_profile``: unset (None in AssistantOptions, negative on the node), the
    model profile's value applies. ``low``/``high`` bound the value wherever it is given; with
    ``bounded_in_library`` false only the node bounds it (thresholds: a library caller may put them
    beyond the score range on purpose, so that every match is uncertain).
    """

    name: str                       # the node parameter, launch argument and Assistant.configure keyword
    kind: type                      # bool, int, float or str
    default: object
    description: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    live: bool = False              # applies while running; the others need a restart (read-only)
    parameter: bool = True          # a node parameter (and launch argument)
    option: str | None = None       # the AssistantOptions field it sets
    argument: str | None = None     # the Assistant.open keyword it sets
    profile_key: str | None = None  # the ModelProfile key it overrides
    follows_profile: bool = False
    bounded_in_library: bool = True
    empty: str | None = None        # an empty string is refused with this reason
    unknown: str | None = None      # what a library caller's value outside the choices is called

    def range_text(self) -> str:
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f">= {self.low:g}"
        return f"[{self.low:g}, {self.high:g}]"

    def problem(self, value, bounded: bool = True) -> str | None:
        """Why ``value`` (a real value, not "use the profile") cannot be this setting's, or None."""
        if self.choices and value not in self.choices:
            allowed = ", ".join(repr(c) if c == "" else str(c) for c in self.choices)
            return f"{self.name} must be one of {allowed}"
        if bounded and (self.low is not None and value < self.low or self.high is not None and value > self.high):
            return f"{self.name} must {'be' if self.high is None else 'lie in'} {self.range_text()}"
        if self.empty and not str(value).strip():
            return self.empty
        return None

    # ---- the node parameter ------------------------------------------------------------------
    def parameter_low(self) -> float | None:
        """The node parameter's lower bound: the negative "use the profile" value included."""
        return float(USE_PROFILE) if self.follows_profile else self.low

    def parameter_problem(self, value) -> str | None:
        """Why ``value`` cannot be this node parameter's, or None when it can."""
        if self.kind is float:
            # Integers are welcome where a float is meant (`-p process_rate_hz:=5`).
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{self.name} must be a number, got {value!r}"
        elif not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            kind = "true or false" if self.kind is bool else "a " + self.kind.__name__
            return f"{self.name} must be {kind}, got {value!r}"
        if self.follows_profile:
            # Every such setting's own range starts at 0, so [-1, high] is all there is to check.
            if not USE_PROFILE <= value <= self.high:
                return f"{self.name} must lie in [{USE_PROFILE}, {self.high:g}]; a negative value keeps the model profile's"
            return None
        return self.problem(value)

    def parameter_text(self) -> str:
        """The description a node parameter, a launch argument and the docs give."""
        text = self.description
        if self.follows_profile:
            text += "; <0 = profile"
        return text

    def option_value(self, value):
        """The AssistantOptions / Assistant.open value of node parameter value ``value``."""
        if self.follows_profile and value < 0:
            return None
        if self.kind is str and value == "":      # the default folder / no verifier model (model refuses "")
            return None
        return float(value) if self.kind is float else value


SETTINGS: tuple[Setting, ...] = (
    Setting("model", str, DEFAULT_MODEL, "Hugging Face model id or local checkpoint folder", argument="model",
            empty="model must name a Hugging Face id or a local folder"),
    Setting("device", str, "auto", "auto, cpu, cuda or cuda:N", argument="device"),
    Setting("dtype", str, "auto", "weight precision", DTYPES, argument="dtype"),
    Setting("store_dir", str, "", "concept store: a folder (empty = $XDG_DATA_HOME/personal_vlm) or a fleet library's postgresql:// URL", argument="store_dir"),
    Setting("profile", str, "", "model profile YAML; empty = models/<model>.yaml or the defaults",
            argument="profile_path"),
    Setting("encoder_backend", str, "torch", "vision encoder on the frame path and for teaching", ENCODER_CHOICES,
            option="backend", unknown="encoder backend"),
    Setting("engine_cache_dir", str, "", "cache for exported ONNX files and TensorRT engines; empty = $XDG_CACHE_HOME/personal_vlm/encoders",
            option="engine_cache"),
    Setting("resident_concepts", int, 10000, "most concept memories held in memory for matching; a fleet library "
            "with more gives each frame its candidates from its pgvector index and loads them on demand", low=1, high=1000000,
            option="resident_concepts"),
    Setting("concept_thresholds", bool, False, "each concept gets its own accept threshold, lowered (to the middle "
            "of the band at most) when no other concept of the library scores near it", option="concept_thresholds"),
    Setting("auto_calibrate", bool, True, "on the first start of a checkpoint whose profile is not calibrated, "
            "measure its layers and thresholds on the built-in synthetic world (in the background, serving with "
            "the defaults meanwhile) and cache them per checkpoint", option="auto_calibrate"),
    Setting("calibration_cache_dir", str, "", "cache of automatic calibrations; empty = "
            "$PERSONAL_VLM_CALIBRATION_CACHE or $XDG_CACHE_HOME/personal_vlm/calibration", option="calibration_cache"),
    Setting("process_rate_hz", float, 2.0, "most camera frames processed per second", low=0.01, high=120.0,
            live=True),
    Setting("accept_threshold", float, float(USE_PROFILE), "match score that detects without verification",
            low=0.0, high=1.0, live=True, option="accept_threshold", profile_key="accept_threshold",
            follows_profile=True, bounded_in_library=False),
    Setting("reject_threshold", float, float(USE_PROFILE), "match score that rejects without verification",
            low=0.0, high=1.0, live=True, option="reject_threshold", profile_key="reject_threshold",
            follows_profile=True, bounded_in_library=False),
    Setting("max_concepts_in_context", int, USE_PROFILE, "most memories in one prompt (/ask, joint recognition), within the profile's context_tokens",
            low=0, high=64,
            live=True, option="max_concepts_in_context", profile_key="max_concepts_in_context",
            follows_profile=True),
    Setting("verification", bool, True, "settle uncertain matches with the model", live=True,
            option="verification"),
    Setting("verifications_per_second", float, 2.0, "most verifications started per second", low=0.01, high=100.0,
            option="verifications_per_second"),
    Setting("verification_busy_fraction", float, 0.5,
            "most of the time verification may compute, beside the frames", low=0.01, high=1.0,
            option="verification_busy_fraction"),
    Setting("overlay", bool, True, "publish ~/overlay and ~/overlay/compressed while someone subscribes", live=True),
    Setting("overlay_jpeg_quality", int, 80, "JPEG quality of ~/overlay/compressed", low=1, high=100, live=True),
    Setting("image_transport", str, "raw", "camera input: raw = sensor_msgs/Image on image, "
            "compressed = sensor_msgs/CompressedImage on image/compressed", ("raw", "compressed")),
    Setting("verifier_model", str, DEFAULT_VERIFIER,
            f"CLIP/SigLIP id or folder for R2P's retrieval and attribute checks (or {SIGLIP_VERIFIER}); "
            "weights that cannot be had = one warning and the VLM's own yes/no; empty = no contrastive model",
            option="verifier_model"),
    Setting("r2p_margin", float, float(USE_PROFILE), "Ego p(yes) this close to its threshold is settled by R2P; "
            "0 = never", low=0.0, high=0.5, live=True, option="r2p_margin", profile_key="r2p_margin",
            follows_profile=True),
    Setting("recognition_method", str, "", "what settles the matcher's uncertain band and fills /ask's prompt: "
            "ego (concept memories) or icpt (the projector's prompts); empty = the model profile's",
            ("",) + RECOGNITION_METHODS, option="recognition_method"),
    Setting("icpt_projector", str, "", "ICPT projector file (personal-vlm icpt-train); empty = the model profile's "
            "icpt.projector; one that is missing, damaged or made for another backbone leaves ICPT unavailable "
            "(one warning) and Ego working", option="icpt_projector"),
    Setting("max_waiting_requests", int, 4, "most requests of one kind (teach, ask, list, forget) waiting behind the "
            "one being worked on; any more are answered at once, success false, \"busy: ...\"", low=0, high=MAX_WAITING_REQUESTS, live=True),
    Setting("web_port", int, 0, "port of the web console (live view, teach by drawing a box, the library, ask); "
            "0 = off", low=0, high=65535),
    Setting("web_host", str, "127.0.0.1", "address the web console listens on; anything but a loopback address "
            "opens it to the network (a warning is logged: set web_token)",
            empty="web_host must name an address, e.g. 127.0.0.1"),
    Setting("web_token", str, "", "when set, every web console request and websocket must carry this token "
            "(401 otherwise); empty = none"),
    # Library options without a node parameter.
    Setting("r2p_top_k", int, 3, "R2P's attribute checks per candidate", low=1, parameter=False, option="r2p_top_k"),
    Setting("r2p_pool", int, 5, "R2P's candidates: the frame's best-matching concepts", low=1, parameter=False,
            option="r2p_pool"),
    Setting("tracker_k", int, 2, "a track appears after k detections in the last n frames", low=1,
            parameter=False, option="tracker_k"),
    Setting("tracker_n", int, 3, "the tracker's window of frames", low=1, parameter=False, option="tracker_n"),
)

BY_NAME = {s.name: s for s in SETTINGS}
PARAMETERS = {s.name: s for s in SETTINGS if s.parameter}
BY_OPTION = {s.option: s for s in SETTINGS if s.option}
BY_PROFILE_KEY = {s.profile_key: s for s in SETTINGS if s.profile_key}
# What Assistant.configure changes while running.
ASSISTANT_LIVE = tuple(s.name for s in SETTINGS if s.live and s.option)


def check_option(field: str, value) -> None:
    """Refuse an AssistantOptions value outside its setting's choices or range (None = the default
    or the profile's)."""
    setting = BY_OPTION.get(field)
    if setting is None or value is None:
        return
    if setting.unknown and value not in setting.choices:
        raise PersonalVLMError(f"unknown {setting.unknown} {value!r}; use one of {', '.join(setting.choices)}")
    problem = setting.problem(value, bounded=setting.bounded_in_library)
    if problem:
        raise PersonalVLMError(f"{problem}, got {value!r}")


def check_profile_key(key: str, value) -> None:
    """Refuse a model profile's value of a shared setting outside that setting's range."""
    setting = BY_PROFILE_KEY[key]
    problem = setting.problem(value, bounded=setting.bounded_in_library)
    if problem:
        raise PersonalVLMError(f"profile: {problem}")


def check_parameters(values: dict) -> list[str]:
    """What is wrong with these node parameter values, one reason per problem (none: usable).

    The decision band is checked only when both thresholds are given; with the profile's, the
    Assistant checks it once the profile is known."""
    problems = [p for p in (PARAMETERS[n].parameter_problem(v) for n, v in values.items()) if p]
    if not problems and values["accept_threshold"] >= 0 and values["reject_threshold"] >= 0:
        problem = check_thresholds(values["accept_threshold"], values["reject_threshold"])
        if problem:
            problems.append(f"{problem}; a negative value keeps the model profile's")
    return problems


def option_values(values: dict) -> dict:
    """AssistantOptions fields from node parameter values ("" and negative: the default / profile's)."""
    return {s.option: s.option_value(values[s.name]) for s in PARAMETERS.values() if s.option}


def open_arguments(values: dict) -> dict:
    """Assistant.open keywords (model, device, dtype, store, profile) from node parameter values."""
    return {s.argument: s.option_value(values[s.name]) for s in PARAMETERS.values() if s.argument}


# ---- the docs --------------------------------------------------------------------------------

def _markdown_default(setting: Setting) -> str:
    if setting.follows_profile:
        return f"`{setting.default}` (profile)"
    if setting.kind is bool:
        return f"`{str(setting.default).lower()}`"
    if setting.kind is str and setting.default == "":
        return '`""`'
    return f"`{setting.default}`"


# The README's short table: what most users set.
MOST_USED = ("model", "device", "dtype", "store_dir", "encoder_backend", "process_rate_hz", "accept_threshold",
             "reject_threshold", "verification", "r2p_margin", "max_concepts_in_context")


def markdown_table(names: tuple[str, ...] | None = None) -> str:
    """The node parameters (``names``, default all) as a markdown table: name, default, live or
    read-only, meaning."""
    rows = ["| parameter | default | changes | meaning |", "|---|---|---|---|"]
    for s in (PARAMETERS[n] for n in (names or PARAMETERS)):
        meaning = s.parameter_text()
        if s.choices:
            meaning += " (" + ", ".join(f"`{c}`" if c else "`\"\"`" for c in s.choices) + ")"
        elif s.range_text():
            meaning += f" ({s.range_text()})"
        rows.append(f"| `{s.name}` | {_markdown_default(s)} | {'live' if s.live else 'restart'} | "
                    f"{meaning.replace('|', '/')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m personal_vlm_node.settings",
                                     description="Print the node parameters, written once here.")
    parser.add_argument("--markdown", action="store_true", help="as the docs' markdown table")
    parser.add_argument("--most-used", action="store_true", help="only the parameters the README lists")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(MOST_USED if args.most_used else None))
    else:
        for s in PARAMETERS.values():
            print(f"{s.name} = {s.default!r}  ({'live' if s.live else 'read-only'}) {s.parameter_text()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
