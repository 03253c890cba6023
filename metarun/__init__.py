"""metarun: a fast, gradient-checked MAML experiment runner."""

__version__ = "0.1.0"
