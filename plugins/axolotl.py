"""``ckptbus.plugins.axolotl``: what an axolotl YAML names, ``plugins: [ckptbus.plugins.axolotl.CkptbusPlugin]``."""

from .integrations.axolotl import AxolotlCheckpointCallback, CkptbusPlugin, config_from_axolotl

__all__ = ["AxolotlCheckpointCallback", "CkptbusPlugin", "config_from_axolotl"]
