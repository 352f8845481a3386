from meshmirror.cli import main

raise SystemExit(main())
