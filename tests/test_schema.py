"""One name for one thing: the names each stage's schema declares are the ones its settings
accept, its registries implement, its reports title and the command line offers."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from cli.app import app
from sparcom.ablation.controls import CONTROLS as CONTROL_DRAWS
from sparcom.ablation.report import CONTROL_WORDS
from sparcom.ablation.schema import CONTROLS, FAMILY_CHOICES
from sparcom.ablation.settings import AblationSettings
from sparcom.curation.packaged_sources import PACKAGED_SETS
from sparcom.curation.schema import PACKAGED_SET_NAMES
from sparcom.extraction.architectures import FFNSites
from sparcom.extraction.extract import store_layout
from sparcom.extraction.schema import COUNT_FAMILIES, FAMILY_NAMES
from sparcom.identification.report import TITLES
from sparcom.identification.rules import select
from sparcom.identification.schema import FAMILIES, GROUP, GROUP_BY, RULES
from sparcom.identification.settings import IdentificationSettings


def literal_choices(model, field: str) -> tuple:
    annotation = model.model_fields[field].annotation
    while get_args(annotation) and not isinstance(get_args(annotation)[0], str):
        annotation = get_args(annotation)[0]  # list[Literal[...]] -> Literal[...]
    return get_args(annotation)


def test_the_settings_accept_exactly_the_schema_names():
    assert literal_choices(IdentificationSettings, "rule") == RULES
    assert literal_choices(IdentificationSettings, "group_by") == GROUP_BY
    assert literal_choices(AblationSettings, "controls") == CONTROLS
    assert literal_choices(AblationSettings, "family") == FAMILY_CHOICES == ("auto", *FAMILY_NAMES)


def test_every_rule_name_has_a_rule_and_no_other_name_does():
    frequency = xr.DataArray(np.array([[0.1, 0.5, 0.0], [0.4, 0.2, 0.3]]), dims=(GROUP, "layer"),
                             coords={GROUP: ["a", "b"]}).expand_dims(neuron=1, axis=2)
    for rule in RULES:
        assert select(frequency, rule, epsilon=0.5, layer_dim="layer").selected.dtype == bool
    with pytest.raises(ValueError, match="unknown selection rule"):
        select(frequency, "not_a_rule")


def test_controls_families_and_packaged_sets_have_one_list_each():
    assert tuple(CONTROL_DRAWS) == CONTROLS and set(CONTROL_WORDS) == set(CONTROLS)
    assert tuple(f.name for f in FAMILIES) == FAMILY_NAMES and set(TITLES) == set(FAMILY_NAMES)
    assert [(f.count, f.dims) for f in FAMILIES] == [(f.count, f.dims) for f in COUNT_FAMILIES]
    assert tuple(PACKAGED_SETS) == PACKAGED_SET_NAMES


def test_the_store_holds_the_schema_variables_with_the_schema_dims():
    moe_layer = type("MoELayer", (), {"index": 3})()
    sites = FFNSites(dense_layers=(0, 1, 2), dense_activations=(), dense_neurons=8, moe_layers=(moe_layer,),
                     experts=4, expert_neurons=6, shared_neurons=5, last_mlp=None, names={})
    variables, layer_coords = store_layout(sites)
    assert variables == {f.count: (f.dims, shape) for f, shape in zip(COUNT_FAMILIES, [(3, 8), (1, 4), (1, 4, 6), (1, 5)])}
    assert layer_coords == {"layer": (0, 1, 2), "moe_layer": [3]}


@pytest.mark.parametrize(("command", "option", "names"), [
    ("identify", "--rule", RULES), ("identify", "--group-by", GROUP_BY),
    ("ablate", "--family", FAMILY_CHOICES), ("ablate", "--controls", CONTROLS)])
def test_the_command_line_offers_the_schema_names(command, option, names):
    help_text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output
    line = next(line for line in help_text.splitlines() if f"{option} " in line)
    assert all(name in line for name in names), line
