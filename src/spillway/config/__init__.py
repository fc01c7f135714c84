"""Configuration: the schema, the embedded default, and the loader."""

from spillway.config.schema import Config, KeyConfig, NodeConfig, Timeouts

__all__ = ["Config", "KeyConfig", "NodeConfig", "Timeouts"]
