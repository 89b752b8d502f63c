"""``python -m portside`` is the ``portside`` command."""

from portside.cli import main

raise SystemExit(main())
