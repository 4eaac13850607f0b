"""``python -m actswap.cli``: the same as the ``actswap`` command."""

from . import main

main()
