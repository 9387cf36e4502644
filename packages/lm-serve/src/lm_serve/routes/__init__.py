"""One module per group of endpoints; each exposes an `APIRouter` called `router`."""
