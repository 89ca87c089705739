"""The README's generated tables are current (its tour runs as a doctest: pytest collects README.md)."""

import pathlib

from qlab.experiments import methods_table, schema_table

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_study_keys_and_methods_tables_are_current():
    assert schema_table() in README, "README's study keys table is stale: paste qlab.experiments.schema_table()"
    assert methods_table() in README, "README's methods table is stale: paste qlab.experiments.methods_table()"


def test_the_tour_is_a_doctest():
    assert README.count(">>> ") >= 20
