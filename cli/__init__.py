"""The ``lorascope`` command line (installed as the package ``lorascope_cli``): parse, call the library, print."""
