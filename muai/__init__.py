"""MuAI: the `muai` command and the configuration loader shared by the orchestrator and the sidecar."""

from muai.config import ConfigError, ConfigUpdateError, MuaiConfig, apply_update, load_config

__version__ = "0.1.0"

__all__ = ["ConfigError", "ConfigUpdateError", "MuaiConfig", "__version__", "apply_update", "load_config"]
