from ddm.coordinator.cli import main

raise SystemExit(main())
