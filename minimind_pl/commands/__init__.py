"""The tool commands of ``python main.py <command>``: each module holds one command function whose typed
signature and docstring are its command line (see ``minimind_pl.cli``). Library code never imports these."""
