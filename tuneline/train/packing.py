"""Packing without a varlen attention kernel: each packed bin is its own row of the batch.

TRL's packing (best-fit-decreasing bins of at most `max_length` tokens) is padding-free: it
flattens a whole batch into one sequence and leaves the example boundaries to a varlen kernel
(flash attention). Without one (CPU, SDPA or eager on a GPU) attention over that one sequence is
dense, quadratic in the batch's total length. Here the same bins stay separate rows, padded to
the longest bin of the batch; position ids restart at 0 for every example and the model gets no
2D attention mask, so transformers builds a block-diagonal causal mask per row from the position
ids (`masking_utils.find_packed_sequence_indices`): no example attends to another, padding
attends only to itself, and attention costs at most rows x max_length².

Imports trl: import this module inside the functions that train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.utils.generic import is_flash_attention_requested
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


def has_varlen_attention(model: Any) -> bool:
    """Whether the model attends with a flash-attention (varlen) kernel, which TRL's padding-free
    packing needs to keep one long flattened sequence cheap."""
    return is_flash_attention_requested(model.config)


@dataclass
class PackedRowsCollator(DataCollatorForLanguageModeling):
    """TRL's collator without flattening: one row per packed bin, per-example position ids and
    the 2D padding mask (TRL counts real tokens with it; `PackedRowsTrainer` keeps it from the model)."""

    padding_free: bool = False
    return_position_ids: bool = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        # The label of an example's first token would be predicted from the end of the example
        # before it in the row: never train on it (TRL's padding-free collator does the same).
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


class PackedRowsTrainer(SFTTrainer):
    """TRL's SFT trainer with `packing` whose batches are rows of packed bins (`PackedRowsCollator`).

    TRL refuses a custom collator when packing, so the collator is swapped in after construction.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_collator = PackedRowsCollator(
            pad_token_id=self.data_collator.pad_token_id, pad_to_multiple_of=self.args.pad_to_multiple_of
        )

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """TRL's loss with the model called without the 2D attention mask: given one, transformers
        would let the examples of a row attend to each other. TRL still reads the mask to count
        the real tokens, as it does for padded batches."""

        def forward_without_mask(**model_inputs: Any) -> Any:
            model_inputs.pop("attention_mask", None)
            return model(**model_inputs)

        return super().compute_loss(forward_without_mask, inputs, return_outputs, num_items_in_batch)
