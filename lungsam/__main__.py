"""``python -m lungsam``: the same command line as ``lungsam`` (also ``torchrun -m lungsam train ...``)."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="lungsam")
