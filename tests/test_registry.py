import types
from types import SimpleNamespace

import pytest
from pydantic import BaseModel, ConfigDict

import compatzoo
from compatzoo.errors import PluginError, SpecError
from compatzoo.hookspecs import hookimpl
from compatzoo.registry import DuplicateComponentError, Registry, get_registry


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Component:
    Params = NoParams

    def __init__(self, params):
        self.params = params


def _plugin_module(name: str, kind: str, component: str) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def register_components(register):
        register(kind, component, Component)

    module.register_components = register_components
    return module


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint with a chosen distribution."""

    def __init__(self, name, load, dist="fake-dist", version="9.9"):
        self.name, self._load = name, load
        self.dist = SimpleNamespace(name=dist, version=version)

    def load(self):
        return self._load()


def test_third_party_plugin_is_discovered_through_its_entry_point():
    registry = get_registry()
    record = registry.get("scheduler", "reverse")
    assert record.distribution == "compatzoo-example-plugin"
    assert record.plugin == "example"
    assert "feature-norm" in compatzoo.list_plugins()["loss"]
    scheduler = compatzoo.create_scheduler("reverse")
    state = SimpleNamespace(old_features=[0, 0, 0, 0])
    assert scheduler.order(state).tolist() == [3, 2, 1, 0]


def test_builtins_come_through_the_same_entry_point_group():
    registry = get_registry()
    assert registry.get("encoder", "tiny-cnn").distribution == "compatzoo"
    assert registry.get("encoder", "tiny-cnn").plugin == "core"
    assert registry.get("loss", "bct").distribution == "compatzoo-bct"
    plugins = compatzoo.list_plugins()
    assert set(plugins) == {"encoder", "head", "loss", "upgrader", "scheduler", "dataset",
                            "allocation", "bundle"}
    assert {"resnet50", "mobilenet_v2", "tiny-cnn", "open-clip"} <= set(plugins["encoder"])
    assert set(plugins["head"]) >= {"linear", "normface", "cosface", "arcface"}
    assert "identity" in plugins["upgrader"] and "random" in plugins["scheduler"]
    assert compatzoo.list_plugins("resnet*")["encoder"] == [
        "resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]


def test_duplicate_names_fail_naming_both_distributions():
    registry = Registry()
    registry.load_entry_points([
        FakeEntryPoint("one", lambda: _plugin_module("m1", "loss", "same"), dist="dist-one"),
    ], strict=True)
    with pytest.raises(DuplicateComponentError) as info:
        registry.load_entry_points([
            FakeEntryPoint("two", lambda: _plugin_module("m2", "loss", "same"), dist="dist-two"),
        ], strict=False)  # even tolerant loading never picks one silently
    assert "dist-one" in str(info.value) and "dist-two" in str(info.value)
    assert registry.get("loss", "same").distribution == "dist-one"


def _broken():
    raise ImportError("No module named 'torch_nonexistent'")


def test_failing_plugin_is_reported_and_skipped_in_tolerant_mode():
    registry = Registry()
    registry.load_entry_points([
        FakeEntryPoint("broken", _broken, dist="compatzoo-broken"),
        FakeEntryPoint("fine", lambda: _plugin_module("m3", "scheduler", "fine")),
    ], strict=False)
    assert registry.names("scheduler") == ["fine"]
    [failed] = registry.failed
    assert failed.plugin == "broken" and failed.distribution == "compatzoo-broken"
    assert "torch_nonexistent" in failed.error
    with pytest.raises(PluginError) as info:
        registry.get("loss", "missing")
    assert "compatzoo-broken" in str(info.value)  # the failure is named where it matters


def test_failing_plugin_raises_in_strict_mode(monkeypatch):
    monkeypatch.setenv("COMPATZOO_STRICT_PLUGINS", "1")
    registry = Registry()
    with pytest.raises(PluginError, match="broken.*compatzoo-broken.*torch_nonexistent"):
        registry.load_entry_points([FakeEntryPoint("broken", _broken, dist="compatzoo-broken")])


def test_unknown_kind_and_bad_params_model_are_rejected():
    bad_kind = _plugin_module("m4", "optimizer", "x")
    with pytest.raises(PluginError, match="unknown kind 'optimizer'"):
        Registry().add_plugin(bad_kind, "p", "d", "1")

    def registering(*args) -> types.ModuleType:
        module = types.ModuleType("m5")

        @hookimpl
        def register_components(register):
            register("loss", "x", *args)

        module.register_components = register_components
        return module

    with pytest.raises(PluginError, match="declare its params as a pydantic model in the "
                                         "attribute `Params`"):
        Registry().add_plugin(registering(object), "p", "d", "1")
    with pytest.raises(PluginError, match=r"takes the component alone \(1 more"):
        Registry().add_plugin(registering(Component, NoParams), "p", "d", "1")


def test_unknown_name_lists_installed_ones():
    with pytest.raises(PluginError) as info:
        compatzoo.get_loss("bcct")
    message = str(info.value)
    assert "no loss named 'bcct'" in message
    assert "bct" in message and "classification" in message


def test_constructors_validate_params():
    head = compatzoo.create_head("cosface", embedding_dim=8, num_classes=3, margin=0.2)
    assert head.margin == pytest.approx(0.2) and head.scale == pytest.approx(32.0)
    with pytest.raises(SpecError, match="params.marginn: unknown parameter"):
        compatzoo.create_head("cosface", embedding_dim=8, num_classes=3, marginn=0.2)
    with pytest.raises(SpecError, match="params.scale"):
        compatzoo.create_head("cosface", embedding_dim=8, num_classes=3, scale=-1)


def test_plugins_command_lists_components(capsys):
    from compatzoo.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "compatzoo-example-plugin" in out and "reverse" in out
    assert any(line.split()[:3] == ["loss", "bct", "compatzoo-bct"] for line in out.splitlines())
