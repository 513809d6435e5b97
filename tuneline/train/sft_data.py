"""SFT data for the train stage: records as trainer rows, and the validation split scored in training.

Two ways to keep the loss on what the assistant says, picked from the chat template:
- `assistant_only`: the template marks assistant output with `{% generation %}` (the tiny model's
  ChatML does, end-of-turn token included); records train as whole conversations, tokenized here
  with the template's assistant mask (what TRL would compute) so that a turn with OpenAI's
  `weight: 0` can be taken out of the loss.
- `completion_only`: most hub templates have no markers; each record becomes a conversational
  prompt (every turn before the last assistant turn to learn from) and completion (that turn,
  rendered by the template with its end-of-turn token).

A record whose assistant turns all have `weight: 0` has nothing to learn and is dropped with a reason.

Validation records score the loss and, through `ExactMatchCallback`, the task metric (greedy
answers compared with the reference), which can pick the best checkpoint and stop training early.
"""

from __future__ import annotations

from typing import Any, Literal

from transformers import TrainerCallback

from tuneline import models
from tuneline.errors import UserError
from tuneline.recipe import TrainSpec
from tuneline.records import REASONING, with_think
from tuneline.store import StageRef, StageWriter, iter_records

LossMode = Literal["assistant_only", "completion_only"]


class TrainDataError(UserError, ValueError):
    """Training data the trainer cannot learn from, or a validation split evaluation needs but lacks."""


def choose_loss_mode(tokenizer: Any) -> LossMode:
    """`assistant_only` when the chat template has `{% generation %}` markers, else `completion_only`."""
    return "assistant_only" if models.has_generation_markers(tokenizer.chat_template) else "completion_only"


def prompt_length(tokenizer: Any, messages: list[dict[str, Any]]) -> int:
    """Tokens of the turns before an assistant reply, generation prompt included."""
    return len(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def training_row(
    record: dict[str, Any], tokenizer: Any, loss_mode: LossMode, max_length: int
) -> tuple[dict[str, Any] | None, str, str]:
    """A record as an SFT row, or (None, reason, detail) when it cannot be learned from.

    A record without an assistant turn, or whose assistant turns all have `weight: 0`, has nothing
    to learn; one whose prompt alone fills `max_length` would be truncated to no trainable token
    (TRL would silently skip it).
    """
    answers = [i for i, m in enumerate(record["messages"]) if m["role"] == "assistant"]
    if not answers:
        return None, "no_assistant_turn", "messages: no assistant turn to learn from"
    learned = [i for i in answers if record["messages"][i].get("weight", 1) != 0]
    if not learned:
        turns = ", ".join(f"messages[{i}]" for i in answers)
        return None, "nothing_to_learn", f"every assistant turn has weight 0 ({turns}); nothing to learn"
    messages = [models.clean_message(m) for m in record["messages"]]
    prompt_end = learned[0] if loss_mode == "assistant_only" else learned[-1]
    length = prompt_length(tokenizer, messages[:prompt_end]) if prompt_end else 0
    if length >= max_length:
        detail = f"prompt is {length} tokens, train.max_length is {max_length}; raise train.max_length"
        return None, "prompt_exceeds_max_length", detail
    if loss_mode == "assistant_only":
        return assistant_row(tokenizer, messages, answers, learned)
    return {"prompt": messages[:prompt_end], "completion": [messages[prompt_end]]}, "", ""


def assistant_row(
    tokenizer: Any, messages: list[dict[str, Any]], answers: list[int], learned: list[int]
) -> tuple[dict[str, Any] | None, str, str]:
    """A conversation tokenized with its assistant mask, turns of weight 0 masked out.

    TRL takes `input_ids` + `assistant_masks` as they are (labels are -100 where the mask is 0);
    `messages` stays so that TRL still sees a conversational dataset. Each `{% generation %}` span
    of the template is one assistant turn, in order; a template that marks fewer (only the last
    turn, say) cannot take one turn out, and the record is dropped rather than trained on it.
    """
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = list(encoded["assistant_masks"])
    if 1 not in mask:  # TRL would raise for the whole dataset; one record is dropped instead
        detail = "the chat template marks no assistant token; check its {% generation %} markers"
        return None, "no_assistant_tokens", detail
    if learned != answers:
        spans = mask_spans(mask)
        if len(spans) != len(answers):
            detail = (
                f"the chat template marks {len(spans)} assistant spans for {len(answers)} assistant turns, "
                "so a turn with weight 0 cannot be left out of the loss; drop the weights or use a template "
                "whose {% generation %} wraps every assistant turn"
            )
            return None, "weight_not_applicable", detail
        for turn, (start, end) in zip(answers, spans, strict=True):
            if turn not in learned:
                mask[start:end] = [0] * (end - start)
    return {"messages": messages, "input_ids": list(encoded["input_ids"]), "assistant_masks": mask}, "", ""


def mask_spans(mask: list[int]) -> list[tuple[int, int]]:
    """The (start, end) of each run of 1s in a token mask."""
    spans: list[tuple[int, int]] = []
    for index, bit in enumerate(mask):
        if bit and (index == 0 or not mask[index - 1]):
            spans.append((index, index + 1))
        elif bit:
            spans[-1] = (spans[-1][0], index + 1)
    return spans


def with_reasoning(
    record: dict[str, Any], tokenizer: Any, reasoning: Literal["include", "drop"]
) -> dict[str, Any]:
    """The record as training sees it under `train.reasoning`: `drop` removes each assistant turn's
    reasoning_content; `include` keeps it for a chat template that renders reasoning_content
    (Qwen3, DeepSeek-R1) and otherwise writes it before the answer as <think>...</think>, so the
    loss covers the reasoning and then the answer either way."""
    if not any(m.get(REASONING) for m in record["messages"]):
        return record
    native = REASONING in (tokenizer.chat_template or "")
    messages = []
    for original in record["messages"]:
        message = {key: value for key, value in original.items() if key != REASONING}
        thought = original.get(REASONING)
        if thought and reasoning == "include":
            message.update(
                {REASONING: thought} if native else {"content": with_think(thought, message["content"])}
            )
        messages.append(message)
    return {**record, "messages": messages}


def make_training_rows(
    records: list[dict[str, Any]], tokenizer: Any, loss_mode: LossMode, max_length: int, writer: StageWriter
) -> list[dict[str, Any]]:
    """Training rows for the SFT trainer; records it cannot learn from are dropped with a reason."""
    rows = []
    for record in records:
        row, reason, detail = training_row(record, tokenizer, loss_mode, max_length)
        if row is None:
            writer.drop(record, reason, detail)
            continue
        rows.append(row)
        writer.keep({"id": record["id"]}, "trained.jsonl")
    return rows


def validation_conversations(
    splits: StageRef, tokenizer: Any, loss_mode: LossMode, train: TrainSpec
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(SFT row, conversation) for each usable validation record: the row scores validation loss,
    the conversation exact match. Raises TrainDataError when evaluation has nothing to score."""
    pairs = []
    for record in iter_records(splits, "validation.jsonl"):
        row, _, _ = training_row(
            with_reasoning(record, tokenizer, train.reasoning), tokenizer, loss_mode, train.max_length
        )
        if row is not None:
            pairs.append((row, [models.clean_message(m) for m in record["messages"]]))
    if not pairs:
        raise TrainDataError(
            f"train.eval_steps: {train.eval_steps}, but {splits.path}/validation.jsonl has no usable "
            "record; raise split.validation or set train.eval_steps to null"
        )
    return pairs


class ExactMatchCallback(TrainerCallback):
    """After each evaluation, greedy answers to up to `eval_max_examples` validation records and
    their exact match as `eval_exact_match`: the task metric, next to the validation loss."""

    def __init__(
        self, tokenizer: Any, validation: list[tuple[dict[str, Any], list[dict[str, Any]]]], train: TrainSpec
    ) -> None:
        self.tokenizer = tokenizer
        self.conversations = [conversation for _, conversation in validation[: train.eval_max_examples]]
        self.max_new_tokens = train.eval_max_new_tokens
        self.batch_size = train.batch_size

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Add exact match to the metrics the trainer keeps the best checkpoint and stops early by."""
        from tuneline.evaluate.stage import exact_match, generate_replies, split_conversation

        model = kwargs["model"]
        was_training = model.training
        model.eval()
        replies = generate_replies(
            model,
            self.tokenizer,
            self.conversations,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        model.train(was_training)
        references = [split_conversation(c)[1]["content"] for c in self.conversations]
        score = exact_match(replies, references)
        if metrics is not None:
            metrics["eval_exact_match"] = score
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1]["eval_exact_match"] = score  # the trainer logged before this ran
