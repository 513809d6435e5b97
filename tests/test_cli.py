"""The CLI's promises: bad input is a clear message and exit code, never a traceback."""

import logging
import sys

from typer.testing import CliRunner

from tuneline.cli.main import app, hide_user_error_tracebacks
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
