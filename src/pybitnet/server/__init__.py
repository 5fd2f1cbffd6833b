"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn), with continuous batching.

Import it explicitly (`pybitnet.server`): `import pybitnet` does not pull in the web stack.
"""

from .app import create_app
from .run import GracefulServer, build_server
from .state import ServerSettings

__all__ = ["GracefulServer", "ServerSettings", "build_server", "create_app"]
