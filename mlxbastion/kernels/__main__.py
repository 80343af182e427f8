"""``python -m mlxbastion.kernels``: build the CPU quantized kernel now."""

import logging
import sys

from . import build, load, unsupported_reason

logging.basicConfig(level=logging.INFO, format="%(message)s")
reason = unsupported_reason()
if reason:
    print(f"CPU quantized kernel not used: {reason}")
elif load() is None:
    sys.exit(1)
else:
    print(f"CPU quantized kernel ready: {build()}")
