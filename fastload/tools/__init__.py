"""User tools over a reinforced dataset: ``fastload inspect`` (summary and validation) and the
export of its records as plain columns."""
