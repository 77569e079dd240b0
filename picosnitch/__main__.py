from picosnitch.cli import main

raise SystemExit(main())
