"""signserve's HTTP service: FastAPI + uvicorn over the checkpoints in models/checkpoints/."""
