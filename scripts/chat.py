#!/usr/bin/env python
"""Chat with a quantized (or unquantized) checkpoint in the terminal; the same as ``llmq chat``.

    python scripts/chat.py --model /path/to/quantized --greedy
"""

import sys

from llmq.chat import main

if __name__ == "__main__":
    sys.exit(main())
