#!/usr/bin/env python
"""Transport benchmark: the same as ``streamcal bench transport``.

    python scripts/bench_transport.py --json bench-transport.json
    python scripts/bench_transport.py --quick
"""

from __future__ import annotations

import sys

from streamcal.bench import main

if __name__ == "__main__":
    sys.exit(main())
