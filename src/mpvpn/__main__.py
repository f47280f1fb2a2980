from mpvpn.cli import main

raise SystemExit(main())
