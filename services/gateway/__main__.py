"""`python -m services.gateway [FLAGS]` (or `scalellm serve gateway [FLAGS]`): run one gateway.

Prints ``READY HOST:HTTP_PORT grpc=HOST:GRPC_PORT`` once both listeners accept connections.
"""

from __future__ import annotations

import logging
import sys

from scalellm.lifecycle import run_event_loop
from services.gateway.config import GatewayConfig
from services.gateway.server import serve


def main(argv: list[str] | None = None) -> int:
    """Parse flags (env fallbacks), serve until SIGTERM; 0 on a clean stop, 1 if it cannot start."""
    config = GatewayConfig.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        run_event_loop(serve(config), config.event_loop)
    except (ValueError, OSError, RuntimeError) as exc:  # bad model folder or keys file, port in use
        logging.getLogger("services.gateway").error("gateway failed to start: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
