"""`python -m gpuguard.ctl`, as the `gpuguardctl` script."""

import sys

from gpuguard.ctl import main

sys.exit(main())
