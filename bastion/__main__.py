from bastion.cli import main

raise SystemExit(main())
