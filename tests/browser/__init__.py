"""Browser tests of the HTML report (a package, so its conftest does not shadow tests/conftest.py)."""
