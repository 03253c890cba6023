"""``python -m metarun`` is the ``metarun`` command."""

from metarun.cli import main

if __name__ == "__main__":  # worker processes that re-import this module must not run it
    main()
