"""RTN: what TPU-MLIR does alone. The float weights are handed over unchanged."""

from llmc_tpu.methods.base import BlockContext, Method


class RtnMethod(Method):
    name = "RTN"
    needs_calibration = False

    def process_block(self, ctx: BlockContext) -> None:
        """Nothing to transform: the TPU's round-to-nearest is applied by the pipeline."""

