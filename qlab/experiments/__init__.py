"""qlab.experiments: studies (TOML) -> runs -> result tables. See :func:`sweep`.

Example:
    >>> from qlab.experiments import expand
    >>> len(expand({"sweep": {"bits": [8, 4, 2]}}))
    3
"""

from .config import BUILTIN_RULE_SETS, DEFAULTS, ConfigError, Study, config_hash, expand, load_study
from .methods import REGISTRY, register

__all__ = ["BUILTIN_RULE_SETS", "DEFAULTS", "ConfigError", "Study", "config_hash", "expand", "load_study",
           "REGISTRY", "register"]
from .results import load_results, method_labels, method_table, setting_label
from .runner import SweepError, sweep

__all__ += ["load_results", "method_labels", "method_table", "setting_label", "SweepError", "sweep"]
