"""`torchrun --nproc_per_node=N -m subjectdiff.train [--preset NAME] [--config FILE.toml] [KEY=VALUE ...]` (or
`python -m subjectdiff.train`, and `python -m subjectdiff.train preview ...`)."""

from subjectdiff.train.cli import main

raise SystemExit(main())
