"""Will this adapter do anything on this model? `check_adapter`, `check_base` and `check_many`
(`checks`), from headers (and optionally values) alone. Imports the checkpoint and rules layers."""
