from sinkinterp.cli import main

raise SystemExit(main())
