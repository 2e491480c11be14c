import sys

from ._cli import main


if __name__ == "__main__":  # a spawned report worker may import this module
    sys.exit(main())
