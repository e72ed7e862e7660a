"""``python -m lungsam``: the ``lungsam`` command line (needed by ``torchrun -m lungsam train ...``)."""
from .cli import main

if __name__ == "__main__":
    main()
