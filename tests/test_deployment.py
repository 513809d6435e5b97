"""The deployment file points at the real flow, whose one parameter (the recipe) the UI renders as a form."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_entrypoint_loads_the_finetune_flow(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    config = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    (deployment,) = config["deployments"]
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert flow.name == "finetune"
    schema = parameter_schema(flow.fn).model_dump()
    assert schema["required"] == ["recipe"]
    recipe = schema["definitions"]["Recipe"]
    assert {"sources", "clean", "quality", "split", "model", "train", "evaluate", "register"} <= set(
        recipe["properties"]
    )
    assert recipe["additionalProperties"] is False
