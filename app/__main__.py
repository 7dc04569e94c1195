"""python -m app [flags]: run the OpenAI-compatible API layer (see --help; every flag is also an env var)."""

import logging

from app.config import AppSettings
from app.main import create_app
from common.drain import Drain, serve
from common.settings_cli import parse_settings


def main() -> None:
    settings = parse_settings(AppSettings, description="OpenAI-compatible API over the llm-serve model server")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per model-server call
    drain = Drain(settings.shutdown_grace_s)
    # access_log off: app.request_log writes one line per request, with its id, tokens and latencies.
    serve(create_app(settings, drain=drain), drain, host=settings.host, port=settings.port,
          log_level=settings.log_level, access_log=False)


if __name__ == "__main__":
    main()
