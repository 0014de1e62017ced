"""Config field checks: a misspelt field anywhere (section, free-named section, override) is one line."""

import dataclasses

import ml_collections
import pytest

from vlm_jax.config_lib import ConfigError, MapOf, check_fields, defaults_of, merged, typed


def schema():
    return ml_collections.ConfigDict({
        "seed": 0,
        "optim": {"learning_rate": 1e-3, "trainable": ()},
        "train_data": MapOf(ml_collections.ConfigDict({"split": "train", "paths": ""})),
        "variants": MapOf(None),
    })


def one_line_error(function, *args):
    with pytest.raises(ConfigError) as error:
        function(*args)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_check_fields_accepts_every_known_field_and_any_name_in_a_map():
    config = {"seed": 3, "optim": {"learning_rate": 0.1}, "train_data": {"a": {"split": "x"}, "b": {}},
              "variants": {"wide": {"anything": {"goes": 1}}}}
    check_fields(ml_collections.ConfigDict(config), schema())
    check_fields(config, schema())


@pytest.mark.parametrize("config, field, suggestion", [
    ({"sede": 1}, "config.sede", "config.seed"),
    ({"optim": {"learning_rat": 1.0}}, "config.optim.learning_rat", "config.optim.learning_rate"),
    ({"train_data": {"cc12m": {"splits": "x"}}}, "config.train_data.cc12m.splits", "config.train_data.cc12m.split"),
])
def test_check_fields_names_the_misspelt_field_and_the_closest_one(config, field, suggestion):
    message = one_line_error(check_fields, config, schema())
    assert message.startswith(f"{field} is not a field") and f"did you mean {suggestion}?" in message


def test_check_fields_without_a_close_match_lists_the_known_fields():
    message = one_line_error(check_fields, {"optim": {"zzz": 1}}, schema())
    assert "expected one of ['learning_rate', 'trainable']" in message


def test_check_fields_does_not_look_into_leaf_values_but_needs_sections_where_the_schema_has_them():
    check_fields({"optim": {"trainable": ((r".*", True),)}}, schema())  # a leaf holding a tuple
    assert "config.optim must be a section" in one_line_error(check_fields, {"optim": 3}, schema())
    assert "config.train_data must be a section" in one_line_error(check_fields, {"train_data": 3}, schema())


def test_merged_applies_nested_overrides_to_a_copy():
    base = ml_collections.ConfigDict({"seed": 0, "reco": {"k": 10, "fusion_config": {"width": 32, "heads": 4}}})
    run = merged(base, {"seed": 2, "reco": {"fusion_config": {"width": 96}}}, "variants.wide")
    assert (run.seed, run.reco.k, run.reco.fusion_config.width, run.reco.fusion_config.heads) == (2, 10, 96, 4)
    assert base.reco.fusion_config.width == 32 and base.seed == 0
    with_dirs = ml_collections.ConfigDict({"reco": {"dirs": ()}})
    assert merged(with_dirs, {"reco": {"dirs": ["a", "b"]}}, "v").reco.dirs == ("a", "b")  # lists become tuples
    message = one_line_error(merged, base, {"reco": {"k": "ten"}}, "variants.wide")
    assert message.startswith("variants.wide.reco.k: ")


@pytest.mark.parametrize("overrides, field", [
    ({"sede": 1}, "variants.wide.sede"),
    ({"reco": {"kk": 3}}, "variants.wide.reco.kk"),
    ({"reco": {"fusion_config": {"widht": 3}}}, "variants.wide.reco.fusion_config.widht"),
])
def test_merged_refuses_an_override_of_a_missing_field_in_one_line(overrides, field):
    base = ml_collections.ConfigDict({"seed": 0, "reco": {"k": 10, "fusion_config": {"width": 32}}})
    message = one_line_error(merged, base, overrides, "variants.wide")
    assert message.startswith(f"{field} is not a field")


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 8
    heads: int = 2

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclasses.dataclass(frozen=True)
class Outer:
    k: int = 3
    scale: float | None = None
    names: tuple[str, ...] = ()
    inner: Inner = Inner()


def test_typed_builds_nested_dataclasses_from_a_section():
    built = typed(Outer, ml_collections.ConfigDict({"k": 5, "names": ["a", "b"], "inner": {"width": 12}}), "outer")
    assert built == Outer(k=5, names=("a", "b"), inner=Inner(width=12, heads=2))
    assert typed(Outer, None, "outer") == Outer()
    assert typed(Outer, {"inner": Inner(width=4)}, "outer").inner == Inner(width=4)


def test_typed_names_an_unknown_field_and_wraps_a_rejected_value_in_one_line():
    assert one_line_error(typed, Outer, {"inner": {"widht": 3}}, "outer").startswith(
        "outer.inner.widht is not a field; did you mean outer.inner.width?")
    assert one_line_error(typed, Outer, {"inner": {"width": 9}}, "outer") == (
        "outer.inner: width 9 is not divisible by heads 2")


def test_defaults_of_gives_every_field_and_a_settable_placeholder_for_none():
    section = defaults_of(Outer)
    assert section.k == 3 and section.names == () and section.inner.to_dict() == {"width": 8, "heads": 2}
    assert section.scale is None
    section.scale = 0.5  # a typed placeholder: a float may be set later (e.g. --config.outer.scale=0.5)
    with pytest.raises(TypeError):
        section.scale = "high"
    assert typed(Outer, section, "outer") == Outer(scale=0.5)
