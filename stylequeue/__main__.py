from stylequeue.cli import main

raise SystemExit(main())
