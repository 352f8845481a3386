"""`python -m meshmirror`: the same command line as the installed `meshmirror` script."""

from meshmirror.cli import main

raise SystemExit(main())
