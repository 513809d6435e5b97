"""The registered model's code, logged "from code": MLflow copies this file into the model and runs
it when the model loads, instead of unpickling a `python_model.pkl`.

So loading a registered version trusts this file (plain source, readable in the model's `code/`
folder), the `tuneline` package installed where it loads (no code is bundled with the model), and
the weights of the `model` artifact. The file ends by handing MLflow the model object. MLflow
runs it with mlflow already imported (and its environment set by tuneline.experiment).
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc

from tuneline.recipe import ModelSpec


class TunelineChatModel(mlflow.pyfunc.PythonModel):
    """Greedy chat replies from the merged model folder logged as the `model` artifact.

    MLflow requires a PythonModel subclass; this is the only one. Generation settings come from
    the `model_config` logged with the model (the recipe's evaluate section).
    """

    def load_context(self, context: Any) -> None:
        """Load the tokenizer and model once, when MLflow loads the registered model."""
        from tuneline import models

        folder = context.artifacts["model"]
        self.tokenizer = models.load_tokenizer(ModelSpec(name=folder))
        self.model = models.load_trained(folder)  # a merged model, or a soft-prompt adapter on its base
        self.max_new_tokens = int(context.model_config["max_new_tokens"])
        self.batch_size = int(context.model_config["batch_size"])

    def predict(self, context: Any, model_input: list[list[dict[str, str]]], params: Any = None) -> list[str]:
        """One greedy reply per conversation (a list of {role, content}); a pandas DataFrame with a
        `messages` column is accepted too. A conversation ending on the user is answered; a final
        assistant turn is regenerated (the same prompt as evaluation used)."""
        from tuneline.evaluate.stage import generate_replies

        if hasattr(model_input, "columns"):
            model_input = model_input["messages"].tolist()
        conversations = [[dict(turn) for turn in conversation] for conversation in model_input]
        return generate_replies(
            self.model,
            self.tokenizer,
            conversations,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )


mlflow.models.set_model(TunelineChatModel())
