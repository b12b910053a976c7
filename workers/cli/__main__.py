"""``python -m workers.cli``: the ``billing`` console script."""

from .root import main

main()
