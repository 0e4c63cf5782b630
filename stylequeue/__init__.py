"""The ``stylequeue`` command line."""
