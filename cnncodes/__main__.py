"""`python -m cnncodes` runs the command-line interface."""

from cnncodes._cli.main import main

raise SystemExit(main())
