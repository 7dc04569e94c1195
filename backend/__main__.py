"""python -m backend [flags]: run the model server (see --help; every flag is also an env var)."""

import logging

from backend.config import BackendSettings
from backend.server import create_app
from common.drain import Drain, serve
from common.settings_cli import parse_settings


def main() -> None:
    settings = parse_settings(BackendSettings, description="llama.cpp model server for the internal protocol")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    drain = Drain(settings.shutdown_grace_s)
    serve(create_app(settings, drain=drain), drain, host=settings.backend_host, port=settings.backend_port,
          log_level=settings.log_level, access_log=False)


if __name__ == "__main__":
    main()
