"""The HTTP API: a thin FastAPI layer over ``service``; the science lives in ``core``."""
