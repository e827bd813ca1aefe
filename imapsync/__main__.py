from imapsync.cli import main

raise SystemExit(main())
