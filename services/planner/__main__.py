"""`python -m services.planner [FLAGS]` (or `scalellm serve planner`): run the planner.

Prints ``READY HOST:PORT`` (its gRPC health listener) once it serves.
"""

from __future__ import annotations

import logging
import sys

from scalellm.lifecycle import run_service
from services.planner.config import PlannerServiceConfig
from services.planner.server import serve


def main(argv: list[str] | None = None) -> int:
    """Parse flags (env fallbacks), serve until SIGTERM; 0 on a clean stop, 1 if it cannot start."""
    config = PlannerServiceConfig.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_service("planner", serve(config))


if __name__ == "__main__":
    sys.exit(main())
