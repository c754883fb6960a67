"""`python -m seedselect_cli` is the same as the `seedselect` console script."""

from seedselect_cli.entry import main

raise SystemExit(main())
