"""The command line (`fastkeys inspect`, `check`, `demo`): `main`, and the demo's scenario (`demo`).
The top layer: imports every layer below, and nothing imports it."""
