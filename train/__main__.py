"""`torchrun --nproc_per_node=N -m subjectdiff.train --config FILE_OR_PRESET [KEY=VALUE ...]` (or `python -m subjectdiff.train`)."""

from subjectdiff.train.cli import main

raise SystemExit(main())
