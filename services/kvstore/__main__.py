"""`python -m services.kvstore [FLAGS]` (or `scalellm serve kvstore [FLAGS]`): run one kvstore replica.

Prints ``READY HOST:PORT`` once it serves (port 0 in --listen picks a free one).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from services.kvstore.config import KvstoreConfig
from services.kvstore.server import serve


def main(argv: list[str] | None = None) -> int:
    """Parse flags (env fallbacks), serve until SIGTERM; 0 on a clean stop, 1 if it cannot start."""
    config = KvstoreConfig.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(config))
    except (RuntimeError, OSError) as exc:  # e.g. the listen or metrics port cannot be bound
        logging.getLogger("services.kvstore").error("kvstore failed: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
