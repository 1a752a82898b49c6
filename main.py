"""``python main.py <command>``: see ``python main.py --help``."""

from minimind_pl.cli import main

if __name__ == "__main__":
    main()
