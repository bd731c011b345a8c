"""Thin entry points, one per tutorial workflow: `python -m experiments.<name> --help`."""
