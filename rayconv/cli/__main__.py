"""``python -m rayconv.cli``: the same commands as the ``rayconv`` script."""

from rayconv.cli import main

main()
