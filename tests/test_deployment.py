"""The deployment file points at the real flow, whose one parameter (the recipe) the UI renders as a form."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["finetune", "augment", "refresh", "retention"])
def test_prefect_yaml_entrypoints_load_flows_whose_parameter_is_the_recipe(monkeypatch, name):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    config = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    deployments = {deployment["name"]: deployment for deployment in config["deployments"]}
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(deployments[name]["entrypoint"])
    assert flow.name == name
    schema = parameter_schema(flow.fn).model_dump()
    assert schema["required"] == ["recipe"]
    recipe = schema["definitions"]["Recipe"]
    sections = {"sources", "augment", "clean", "gate", "split", "model", "train", "evaluate", "register"}
    assert sections <= set(recipe["properties"])
    assert recipe["additionalProperties"] is False
