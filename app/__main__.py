"""`python -m app`: serve the checkpoints with uvicorn, configured from SIGNSERVE_* variables."""

from __future__ import annotations

import copy

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from app.main import create_app
from app.server import with_header_timeout
from app.settings import get_settings


def main() -> None:
    settings = get_settings()
    log_config = copy.deepcopy(LOGGING_CONFIG)  # uvicorn's, plus our own logger on the same handler
    log_config["loggers"]["signserve"] = {"handlers": ["default"], "level": settings.log_level.upper(),
                                          "propagate": False}
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.access_log, log_config=log_config,
                http=with_header_timeout(settings.header_timeout_s),
                timeout_keep_alive=settings.keep_alive_timeout_s,
                timeout_graceful_shutdown=settings.shutdown_timeout_s)


if __name__ == "__main__":
    main()
