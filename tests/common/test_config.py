import pydantic
import pytest
import yaml

from common.config import Config, ConfigError, apply_overrides, load_recipe, validate


class Inner(Config):
    threshold: float = 27.0
    min_len: int = 15

    @pydantic.model_validator(mode="after")
    def _check(self):
        if self.min_len < 1:
            raise ValueError(f"min_len ({self.min_len}) must be at least 1; raise min_len")
        return self


class Outer(Config):
    name: str = "x"
    inner: Inner = Inner()
    items: list[str] = []


def test_overrides_parse_yaml_values_and_create_sections():
    tree = apply_overrides({"inner": {"threshold": 1.0}}, ["inner.min_len=3", "items=[a, b]", "name=hello world"])
    assert tree == {"inner": {"threshold": 1.0, "min_len": 3}, "items": ["a", "b"], "name": "hello world"}
    cfg = validate(Outer, tree)
    assert cfg.inner.min_len == 3 and cfg.items == ["a", "b"]


def test_unknown_key_names_the_key_and_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        validate(Outer, {"inner": {"treshold": 3}})
    assert "inner.treshold: unknown key; did you mean inner.threshold?" in str(e.value)


def test_bad_value_and_validator_messages_name_key_and_fix():
    with pytest.raises(ConfigError) as e:
        validate(Outer, {"inner": {"min_len": "many"}})
    assert "inner.min_len" in str(e.value) and "'many'" in str(e.value)
    with pytest.raises(ConfigError, match=r"inner: min_len \(0\) must be at least 1; raise min_len"):
        validate(Outer, {"inner": {"min_len": 0}})


def test_malformed_overrides_and_missing_recipe_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(Outer, bad)


def test_recipe_file_plus_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "from-file", "inner": {"threshold": 5}}))
    cfg = load_recipe(Outer, recipe, ["inner.threshold=7.5"])
    assert (cfg.name, cfg.inner.threshold) == ("from-file", 7.5)
