"""The recipe: validated once, every error with its field path, overrides, the CLI's exit codes."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from tuneline.cli.main import app
from tuneline.recipe import RecipeError, dump_recipe, flatten_recipe, load_recipe

GOOD = {
    "name": "demo",
    "sources": [{"name": "tickets", "path": "data.jsonl"}],
    "model": {"name": "some/model"},
    "register": {"model_name": "demo"},
}


def write(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_are_filled_and_frozen(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.train.lora.r == 16
    assert recipe.split.test == 0.1
    with pytest.raises(Exception, match="frozen"):
        recipe.train.learning_rate = 1.0


def test_every_error_is_listed_with_its_path(tmp_path):
    bad = {**GOOD, "train": {"learning_rate": -1, "epochz": 3}, "split": {"test": 2}}
    del bad["model"]
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, bad))
    problems = "\n".join(caught.value.problems)
    assert "model: required, but missing" in problems
    assert "train.learning_rate: Input should be greater than 0 (got -1)" in problems
    assert "train.epochz: unknown key" in problems
    assert "split.test" in problems and "(got 2)" in problems
    assert len(caught.value.problems) == 4


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ("train.learning_rate=1e-3", lambda r: r.train.learning_rate == 1e-3),
        (
            "train.lora.target_modules=[q_proj,v_proj]",
            lambda r: r.train.lora.target_modules == ["q_proj", "v_proj"],
        ),
        ("sources.0.path=other.jsonl", lambda r: r.sources[0].path == "other.jsonl"),
        ("evaluate.max_examples=5", lambda r: r.evaluate.max_examples == 5),
    ],
)
def test_overrides(tmp_path, override, check):
    assert check(load_recipe(write(tmp_path, GOOD), [override]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate", "expected key=value"),
        ("sources.3.path=x", "is not an item of the list"),
        ("name.first=x", "holds a value, not a section"),
        ("train.lr=0.1", "train.lr: unknown key"),
    ],
)
def test_bad_overrides_name_the_problem(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, GOOD), [override])


def test_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(
        RecipeError, match=r"(?s)recipe.yaml:2: .*not valid YAML: mapping values are not allowed"
    ):
        load_recipe(write(tmp_path, "name: x\nmodel: name: y\n"))


def test_resolved_recipe_round_trips_and_flattens(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    again = load_recipe(write(tmp_path, dump_recipe(recipe), "resolved.yaml"))
    assert again == recipe
    flat = flatten_recipe(recipe)
    assert flat["train.lora.r"] == "16"
    assert flat["sources.0.name"] == "tickets"


def test_check_command_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["recipe", "check", str(write(tmp_path, GOOD))])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(
        app, ["recipe", "check", str(write(tmp_path, {**GOOD, "split": {"test": 0.6, "validation": 0.5}}))]
    )
    assert bad.exit_code == 2
    assert "leaves nothing to train on" in bad.output
    missing = runner.invoke(app, ["recipe", "check", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "cannot read the recipe" in missing.output


def test_schema_command_prints_json_schema():
    result = CliRunner().invoke(app, ["recipe", "schema"])
    schema = json.loads(result.output)
    assert "sources" in schema["properties"] and "register" in schema["required"]


def test_quickstart_recipe_is_valid():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert recipe.name == "support-intents"


def test_a_renamed_section_loads_under_its_old_name_with_a_message(tmp_path):
    with pytest.warns(FutureWarning, match="`quality` section is now called `gate`"):
        recipe = load_recipe(write(tmp_path, {**GOOD, "quality": {"min_records": 3}}))
    assert recipe.gate.min_records == 3
    assert "quality" not in dump_recipe(recipe)
    with pytest.raises(RecipeError, match="quality: renamed gate, and both are set"):
        load_recipe(write(tmp_path, {**GOOD, "quality": {}, "gate": {}}))


def test_mlflow_store_follows_artifacts_dir_unless_the_recipe_names_one(tmp_path):
    """A run pointed at another artifacts folder must not register into the project's MLflow store."""
    path = write(tmp_path, GOOD)
    assert load_recipe(path).register.tracking_uri == "sqlite:///.tuneline/mlflow.db"
    moved = load_recipe(path, [f"artifacts_dir={tmp_path / 'other'}"])
    assert moved.register.tracking_uri == f"sqlite:///{tmp_path / 'other'}/mlflow.db"
    named = load_recipe(path, [f"artifacts_dir={tmp_path}", "register.tracking_uri=http://127.0.0.1:5000"])
    assert named.register.tracking_uri == "http://127.0.0.1:5000"
