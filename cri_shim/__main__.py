from cri_shim.cli import main

raise SystemExit(main())
