"""The CLI's promises: bad input is a clear message and exit code, never a traceback."""

import json
import logging
import sys

from typer.testing import CliRunner

from tuneline.cli.main import app
from tuneline.errors import hide_user_error_tracebacks
from tuneline.recipe import RecipeError


def test_run_with_a_bad_recipe_lists_problems_and_exits_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nsources: []\nmodel: {name: m}\nregister: {model_name: x}\n")
    result = CliRunner().invoke(app, ["run", str(recipe), "train.epochs=0"])
    assert result.exit_code == 2
    assert "sources: List should have at least 1 item" in result.output
    assert "train.epochs: Input should be greater than 0 (got 0)" in result.output


def test_make_tiny_model_names_a_bad_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("not json\n")
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "m"), "--corpus", str(corpus)])
    assert result.exit_code == 2
    assert "no readable records" in result.output


def test_user_errors_are_logged_without_traceback():
    try:
        raise RecipeError("r.yaml", ["train.epochs: bad"])
    except RecipeError:
        user = logging.LogRecord("prefect", logging.ERROR, "", 0, "failed", None, sys.exc_info())
    try:
        raise KeyError("bug")
    except KeyError:
        bug = logging.LogRecord("prefect", logging.ERROR, "", 0, "failed", None, sys.exc_info())
    assert hide_user_error_tracebacks(user) and user.exc_info is None
    assert hide_user_error_tracebacks(bug) and bug.exc_info is not None


def plan_recipe(tmp_path, config: dict) -> str:
    """A recipe whose model folder holds only `config` as config.json (the plan reads nothing else)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: x\nsources: [{name: a, path: a.jsonl}]\n"
        f"model: {{name: '{model_dir}'}}\nregister: {{model_name: x}}\n"
    )
    return str(recipe)


def test_train_plan_on_a_model_with_its_own_code_names_the_switch(tmp_path):
    auto_map = {"AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.MyLM"}
    recipe = plan_recipe(tmp_path, {"model_type": "my_lm", "auto_map": auto_map, "hidden_size": 8})
    result = CliRunner().invoke(app, ["train", "plan", recipe, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert f"model.name: '{tmp_path / 'model'}' needs its own Python code to load" in result.output
    assert "set `model.trust_remote_code: true` in the recipe if you trust that code" in result.output


def test_train_plan_on_an_unknown_architecture_says_so(tmp_path):
    recipe = plan_recipe(tmp_path, {"model_type": "brand_new_arch", "hidden_size": 8})
    result = CliRunner().invoke(app, ["train", "plan", recipe, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "has model_type 'brand_new_arch' in its config.json, which transformers" in result.output
    assert "upgrade transformers" in result.output


def test_recipe_schema_describes_the_model_loading_switches():
    result = CliRunner().invoke(app, ["recipe", "schema"])
    model = json.loads(result.output)["$defs"]["ModelSpec"]["properties"]
    assert "safetensors" in model["allow_pickle_weights"]["description"]
    assert model["allow_pickle_weights"]["default"] is False
    assert "code" in model["trust_remote_code"]["description"]


def test_data_commands_refuse_a_file_without_records(tmp_path):
    """An empty file, blank lines or `[]` is not a dataset: exit 1 naming the file, not `format: none`."""
    for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")]:
        path = tmp_path / name
        path.write_text(content)
        out = tmp_path / f"out-{name}"
        for command in (["inspect", str(path)], ["check", str(path)], ["convert", str(path), str(out)]):
            extra = ["--to", "openai"] if command[0] == "convert" else []
            result = CliRunner().invoke(app, ["data", *command, *extra])
            assert result.exit_code == 1, (command, result.output)
            assert f"error: {path}: holds no records" in result.output
            assert "format: none" not in result.output and "quality gate" not in result.output
        assert not out.exists()  # no empty "converted" file left behind
