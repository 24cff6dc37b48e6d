"""`nnlab serve`: a run folder's model over HTTP (FastAPI + uvicorn). See app.py for the API."""

from nnlab.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
