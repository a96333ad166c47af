"""A plug-in module that fails while it is imported (tests/robustness/test_bad_input.py)."""

raise RuntimeError("this plug-in module needs a setting that is not there")
