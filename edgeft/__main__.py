"""``python -m edgeft``: the command line, so launchers can start it as a module
(``torchrun -m edgeft train ...``, ``accelerate launch -m edgeft train ...``)."""

from edgeft.cli import main

if __name__ == "__main__":
    main()
