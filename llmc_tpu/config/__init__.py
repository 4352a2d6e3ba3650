"""The run configuration: one YAML, validated, every default filled."""

from llmc_tpu.config.errors import ConfigError
from llmc_tpu.config.load import load_config, parse_config
from llmc_tpu.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_config"]
