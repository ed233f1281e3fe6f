"""Every place a setting appears agrees with its one spec in personal_vlm_node.settings."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from personal_vlm_node import settings
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.options import AssistantOptions
from personal_vlm_node.profiles import ModelProfile
from personal_vlm_node.settings import BY_OPTION, BY_PROFILE_KEY, PARAMETERS, SETTINGS

REPO = Path(__file__).resolve().parent.parent
TABLE_BEGIN, TABLE_END = "<!-- parameters:begin -->", "<!-- parameters:end -->"


def test_every_assistant_option_is_a_setting_with_the_same_default():
    option_fields = {f.name: f.default for f in fields(AssistantOptions)}
    assert sorted(option_fields) == sorted(BY_OPTION)
    for field, default in option_fields.items():
        setting = BY_OPTION[field]
        if setting.follows_profile or (setting.kind is str and setting.default == ""):
            assert default is None, field              # unset: the profile's value, or the default folder
        else:
            assert default == setting.default, field


def test_every_shared_profile_key_is_a_profile_field_and_the_node_defaults_to_the_profile():
    profile = {f.name for f in fields(ModelProfile)}
    assert set(BY_PROFILE_KEY) <= profile
    for key, setting in BY_PROFILE_KEY.items():
        assert setting.follows_profile and setting.parameter, key
        assert setting.default == settings.USE_PROFILE and isinstance(setting.default, setting.kind), key


def test_the_config_file_holds_every_node_parameter_at_its_default():
    values = yaml.safe_load((REPO / "config" / "assistant.yaml").read_text(encoding="utf-8"))["/**"]["ros__parameters"]
    assert list(values) == [n for n in PARAMETERS if n in values]      # in the spec's order
    assert values == {name: setting.default for name, setting in PARAMETERS.items()}
    assert all(type(values[n]) is s.kind for n, s in PARAMETERS.items())


def test_the_launch_file_offers_every_node_parameter_with_its_type():
    spec = importlib.util.spec_from_file_location("assistant_launch", REPO / "launch" / "assistant.launch.py")
    launch_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_file)
    assert {n: kind for n, (kind, _) in launch_file.PARAMETER_ARGUMENTS.items()} == \
        {n: s.kind for n, s in PARAMETERS.items()}


def test_node_descriptors_follow_the_spec():
    pytest.importorskip("rcl_interfaces")
    from personal_vlm_node.ros.parameters import descriptor_for

    for name, setting in PARAMETERS.items():
        descriptor = descriptor_for(setting)
        assert descriptor.read_only is (not setting.live), name
        assert descriptor.description.startswith(setting.parameter_text()), name
        ranges = list(descriptor.floating_point_range) + list(descriptor.integer_range)
        if setting.low is None:
            assert ranges == [], name
        else:
            [bounds] = ranges
            assert (bounds.from_value, bounds.to_value) == (setting.parameter_low(), setting.high), name
    concepts = descriptor_for(PARAMETERS["max_concepts_in_context"]).integer_range[0]
    assert (concepts.from_value, concepts.to_value) == (-1, 64)        # negative: the profile's


def test_the_docs_table_is_the_spec_rendered():
    docs = REPO / "docs" / "ros.md"
    if not docs.is_file():
        pytest.skip("docs/ros.md is not in this checkout; the table is checked once it is")
    text = docs.read_text(encoding="utf-8")
    assert TABLE_BEGIN in text and TABLE_END in text, f"{docs} lacks the {TABLE_BEGIN} … {TABLE_END} markers"
    region = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    assert region == settings.markdown_table(), \
        "regenerate it with: python -m personal_vlm_node.settings --markdown"


def test_the_readmes_short_table_is_the_spec_rendered():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- most-used-parameters:begin -->", "<!-- most-used-parameters:end -->"
    assert begin in text and end in text, f"README.md lacks the {begin} … {end} markers"
    region = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert region == settings.markdown_table(settings.MOST_USED), \
        "regenerate it with: python -m personal_vlm_node.settings --markdown --most-used"


def test_the_table_has_one_row_per_parameter_and_says_which_follow_the_profile():
    rows = settings.markdown_table().splitlines()[2:]
    assert [row.split("|")[1].strip(" `") for row in rows] == list(PARAMETERS)
    margin = next(row for row in rows if row.startswith("| `r2p_margin`"))
    assert "`-1.0` (profile)" in margin and "| live |" in margin and "[0, 0.5]" in margin


def test_the_markdown_command_prints_the_table(capsys):
    assert settings.main(["--markdown"]) == 0
    assert capsys.readouterr().out.strip() == settings.markdown_table()


@pytest.mark.parametrize("value, problem", [
    (-1.0, None), (-0.5, None), (0.0, None), (0.5, None),
    (0.6, "r2p_margin must lie in [-1, 0.5]"), (-2.0, "r2p_margin must lie in [-1, 0.5]"),
    ("wide", "r2p_margin must be a number"), (True, "r2p_margin must be a number"),
])
def test_a_node_parameter_is_checked_by_its_setting(value, problem):
    found = PARAMETERS["r2p_margin"].parameter_problem(value)
    assert found == problem if problem is None else found.startswith(problem)


def test_the_r2p_margin_range_is_one_rule_wherever_the_margin_is_given():
    with pytest.raises(PersonalVLMError, match=r"r2p_margin must lie in \[0, 0.5\], got 0.6"):
        AssistantOptions(r2p_margin=0.6).check()
    with pytest.raises(PersonalVLMError, match=r"profile: r2p_margin must lie in \[0, 0.5\]"):
        ModelProfile(r2p_margin=0.6).validate()
    with pytest.raises(PersonalVLMError, match=r"profile: max_concepts_in_context must lie in \[0, 64\]"):
        ModelProfile(max_concepts_in_context=-1).validate()
    assert PARAMETERS["r2p_margin"].parameter_problem(0.6) is not None
    AssistantOptions(r2p_margin=0.5).check()


def test_library_thresholds_may_lie_beyond_the_score_range_but_node_ones_may_not():
    AssistantOptions(accept_threshold=2.0, reject_threshold=-2.0).check()     # every match uncertain
    assert "accept_threshold must lie in [-1, 1]" in PARAMETERS["accept_threshold"].parameter_problem(2.0)


def test_node_values_become_options_and_open_arguments():
    values = {name: setting.default for name, setting in PARAMETERS.items()}
    values.update(store_dir="/tmp/concepts", profile="", verifier_model="", r2p_margin=0.25)
    options = settings.option_values(values)
    assert options["r2p_margin"] == 0.25 and options["max_concepts_in_context"] is None
    assert options["verifier_model"] is None and options["engine_cache"] is None
    assert settings.open_arguments(values) == {"model": settings.DEFAULT_MODEL, "device": "auto", "dtype": "auto",
                                               "store_dir": "/tmp/concepts", "profile_path": None}


def test_setting_names_are_unique_and_each_live_assistant_setting_is_an_option():
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)
    assert set(settings.ASSISTANT_LIVE) == {"accept_threshold", "reject_threshold", "max_concepts_in_context",
                                            "verification", "r2p_margin"}
