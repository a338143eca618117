"""`shitu serve`: recognition over HTTP, a web page, and live gallery edits (FastAPI on uvicorn)."""
