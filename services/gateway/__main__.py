"""`python -m services.gateway [FLAGS]` (or `scalellm serve gateway [FLAGS]`): run one gateway.

Prints ``READY HOST:HTTP_PORT grpc=HOST:GRPC_PORT`` once both listeners accept connections.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from services.gateway.config import GatewayConfig
from services.gateway.server import serve


def _run(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run on uvloop when asked for and installed (it is not on Windows), else on asyncio."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            logging.getLogger("services.gateway").warning("uvloop is not installed; using asyncio")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    """Parse flags (env fallbacks), serve until SIGTERM; 0 on a clean stop, 1 if it cannot start."""
    config = GatewayConfig.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        _run(serve(config), config.event_loop)
    except (ValueError, OSError, RuntimeError) as exc:  # bad model folder or keys file, port in use
        logging.getLogger("services.gateway").error("gateway failed to start: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
