"""``python -m lungsam``: the same command line as ``lungsam``."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="lungsam")
