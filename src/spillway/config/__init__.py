"""Configuration: the schema, the embedded default, and the loader."""

from spillway.config.keys import KeyConfig
from spillway.config.schema import Config, NodeConfig, Timeouts

__all__ = ["Config", "KeyConfig", "NodeConfig", "Timeouts"]
