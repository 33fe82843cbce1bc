"""`torchrun --nproc_per_node=N -m train --config FILE_OR_PRESET [KEY=VALUE ...]` (or `python -m train`)."""

from train.cli import main

raise SystemExit(main())
