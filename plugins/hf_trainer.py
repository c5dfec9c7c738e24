"""``ckptbus.plugins.hf_trainer``: where users import the ``transformers.Trainer`` callback from."""

from .integrations.trainer import CONFIG_KEYS, DynamicCheckpointCallback, config_from_mapping

__all__ = ["CONFIG_KEYS", "DynamicCheckpointCallback", "config_from_mapping"]
