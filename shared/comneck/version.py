"""The package version, for `--version` and `comneck.__version__` (pyproject.toml says the same; tests/test_launch.py checks)."""

__version__ = "0.1.0"
