"""The errors that mean bad input (shown as one line), as opposed to bugs (shown with a traceback)."""

from llmc_tpu.config.errors import ConfigError
from llmc_tpu.data.text import DataError
from llmc_tpu.export.onnx import OnnxExportError
from llmc_tpu.export.output_dir import OutputExistsError
from llmc_tpu.models.loading import ModelLoadError
from llmc_tpu.pipeline import PipelineError
from llmc_tpu.preflight import PreflightError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, OnnxExportError, OutputExistsError, ModelLoadError, PipelineError, PreflightError, PermissionError,
)
