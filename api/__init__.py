"""HTTP (FastAPI) and command-line front ends over engine."""
