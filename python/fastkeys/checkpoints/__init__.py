"""Checkpoints known from their headers alone, read as untrusted files (`scan`): containment,
regular files only, size caps. Imports `fastkeys.engine` and `fastkeys.rules`."""
