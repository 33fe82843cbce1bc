from subjectdiff.cli import main

raise SystemExit(main())
