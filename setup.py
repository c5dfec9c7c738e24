"""Which packages the ``ckptbus`` distribution holds; everything else is in pyproject.toml.

Two source trees make one import package: ``ckptbus/`` and ``plugins/``,
installed as ``ckptbus.plugins`` (pyproject's ``package-dir``). A list in
pyproject.toml has to be kept by hand and once left ``ckptbus.commands`` out
of the wheel; ``find_packages`` walks both trees, so a new sub-package is
installed the moment it has an ``__init__.py``.
"""

from setuptools import find_packages, setup

PLUGINS = "ckptbus.plugins"

core = find_packages(include=["ckptbus", "ckptbus.*"])
plugins = [PLUGINS, *(f"{PLUGINS}.{name}" for name in find_packages("plugins"))]

setup(packages=[*core, *plugins])
