"""qlab.experiments: studies (TOML) -> typed runs -> result tables. See :func:`sweep`.

The path of one spec string, from a study file to a row of ``runs.csv``:

1. :mod:`~qlab.experiments.study` parses the study once into :class:`Run` s holding final values (the
   method, ``QuantSpec`` s, ``qlab.nn.Rule`` s) and validates every key against what the method reads;
2. :mod:`~qlab.experiments.runner` claims each missing run and calls its method;
3. the method (:mod:`~qlab.experiments.image` or :mod:`~qlab.experiments.lm`, registered in
   :mod:`~qlab.experiments.methods` by model family and name) quantizes with ``qlab.nn`` / ``qlab.ptq`` and
   measures;
4. :mod:`~qlab.experiments.results` writes the row from the run's typed values and rebuilds the tables.

Example:
    >>> from qlab.experiments import expand
    >>> len(expand({"sweep": {"bits": [8, 4, 2]}}))
    3
"""

from . import image, lm, lm_ablations  # noqa: F401 -- registers the image and language-model families and their methods
from .methods import FAMILIES, REGISTRY, SPEC_KEYS, Family, Method, method_for, register, register_family, size_metrics
from .results import compare_tables, load_results, method_labels, method_table, setting_label
from .runner import SweepError, plan, study_script, sweep
from .study import (BUILTIN_RULE_SETS, DEFAULTS, KEYS, ConfigError, Run, Study, config_hash, expand, load_study, methods_table,
                    schema_table)

__all__ = ["FAMILIES", "REGISTRY", "SPEC_KEYS", "Family", "Method", "method_for", "register", "register_family",
           "size_metrics", "compare_tables", "load_results", "method_labels", "method_table", "setting_label",
           "SweepError", "plan", "study_script", "sweep", "BUILTIN_RULE_SETS", "DEFAULTS", "KEYS", "ConfigError", "Run", "Study",
           "config_hash", "expand", "load_study", "schema_table", "methods_table"]
