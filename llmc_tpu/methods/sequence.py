"""Methods in sequence on each block: e.g. AWQ's scales and clipping on the float weights, then GPTQ's codes."""

from __future__ import annotations

from llmc_tpu.methods.base import BlockContext, Method


class MethodSequence(Method):
    """Runs its steps one after the other on the same block; a later step sees the weights the earlier ones left.

    The steps share one ``BlockContext``: codes chosen by a step (``ctx.results``) are the block's result,
    and each step adds its own notes to ``ctx.report``.
    """

    def __init__(self, steps: list[Method]) -> None:
        super().__init__(steps[0].special if steps else {})
        self.steps = steps
        self.name = "+".join(step.name for step in steps)
        self.needs_calibration = any(step.needs_calibration for step in steps)
        self.changes_weights = any(step.changes_weights for step in steps)

    def process_block(self, ctx: BlockContext) -> None:
        for step in self.steps:
            step.process_block(ctx)
