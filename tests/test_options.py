"""Options declared once: the engines' option dataclasses, TrainConfig nesting them, the flags."""

import dataclasses
import inspect

import jax.numpy as jnp
import pytest

from zo2_jax import MeZOEngine, Storage, StreamOptions, TrainConfig, ZO2Engine, ZOOptions
from zo2_jax import make_plan
from zo2_jax.core import options
from zo2_jax.train.config import flat_fields


def test_engine_keyword_defaults_are_the_declared_ones():
    for fn in (ZO2Engine.__init__, MeZOEngine.__init__, make_plan):
        sig = inspect.signature(fn).parameters
        for cls in (ZOOptions, StreamOptions) if fn is not MeZOEngine.__init__ else (ZOOptions,):
            for f in dataclasses.fields(cls):
                if f.name == "compute_dtype":  # the engines take a dtype, the config its name
                    assert jnp.dtype(sig[f.name].default) == jnp.dtype(f.default)
                elif f.name in sig:
                    assert sig[f.name].default == f.default, (fn, f.name)
    assert Storage().rounding == ZOOptions().rounding == "stochastic"
    assert ZOOptions().storage() == Storage("float32")
    # an engine's checks are the declaration's (same message from the engine and the config)
    msgs = []
    for make in (lambda: StreamOptions(max_inflight=0),
                 lambda: options.check("max_inflight", 0, StreamOptions)):
        with pytest.raises(ValueError) as e:
            make()
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] == "max_inflight must be an int >= 1 or 'auto', got 0"


@pytest.mark.parametrize("cls,name,bad,good", [
    (ZOOptions, "eps", 0.0, 1e-4), (ZOOptions, "eps", float("nan"), 2),
    (ZOOptions, "num_directions", 0, 3), (ZOOptions, "num_directions", True, 1),
    (ZOOptions, "directions", "uniform", "rademacher"),
    (ZOOptions, "storage_dtype", "int4", "int8"), (ZOOptions, "rounding", "up", "nearest"),
    (StreamOptions, "packed", "maybe", False), (StreamOptions, "packed", 1, "auto"),
    (StreamOptions, "resident_blocks", -1, 2), (StreamOptions, "blocks_per_call", 2.5, 4),
    (StreamOptions, "device_budget_gb", -1.0, 12.5), (StreamOptions, "branches", "both",
                                                       "sequential")])
def test_each_declaration_refuses_what_it_does_not_allow(cls, name, bad, good):
    with pytest.raises(ValueError, match=f"^{name} must be "):
        cls(**{name: bad})
    assert getattr(cls(**{name: good}), name) == good


def test_packed_reads_the_command_lines_yes_and_no_as_booleans():
    assert StreamOptions(packed="yes").packed is True
    assert StreamOptions(packed="no").packed is False
    assert StreamOptions(device_budget_gb=2).engine_kwargs()["device_budget_bytes"] == 2 << 30


def test_train_config_nests_the_options_and_reads_them_flat_or_nested():
    flat = TrainConfig.from_dict({"engine": "zo2", "eps": "1e-2", "packed": "no",
                                  "max_inflight": "3", "rounding": "nearest"})
    nested = TrainConfig.from_dict({"engine": "zo2", "zo": {"eps": 0.01, "rounding": "nearest"},
                                    "stream": {"packed": False, "max_inflight": 3}})
    direct = TrainConfig(engine="zo2", zo=ZOOptions(eps=0.01, rounding="nearest"),
                         stream=StreamOptions(packed=False, max_inflight=3))
    assert flat == nested == direct
    assert flat.zo.eps == 0.01 and flat.stream.packed is False
    # what a checkpoint stores: flat names, and it reads back the same
    saved = flat.to_json()
    assert saved["eps"] == 0.01 and saved["packed"] is False and "zo" not in saved
    assert TrainConfig.from_dict(saved) == flat
    assert TrainConfig.from_dict({**saved, "packed": "yes"}).stream.packed is True  # old format
    assert flat.replace(eps=0.5, lr=1.0).zo.eps == 0.5
    assert flat.replace(stream=StreamOptions()).stream == StreamOptions()
    assert list(flat_fields())[:2] == ["model", "task"]
    assert flat_fields()["packed"][0] == "stream" and flat_fields()["eps"][0] == "zo"


def test_train_config_refuses_bad_nested_options():
    with pytest.raises(ValueError, match=r"unknown config key zo\.packed"):
        TrainConfig.from_dict({"zo": {"packed": "no"}})
    with pytest.raises(ValueError, match=r"unknown config keys \['epsilon'\]"):
        TrainConfig.from_dict({"epsilon": 1})
    with pytest.raises(TypeError, match="TrainConfig.stream must be a StreamOptions"):
        TrainConfig(stream={"packed": False})
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        TrainConfig.from_dict({"eps": "-1"})
    with pytest.raises(ValueError, match="max_inflight / packed: these apply to engine='zo2'"):
        TrainConfig.from_dict({"engine": "mezo", "packed": "no", "max_inflight": 2})
