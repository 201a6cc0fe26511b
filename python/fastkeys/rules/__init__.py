"""What fastkeys knows about PEFT's keys, as data and pure functions: the method records
(`records`), key matching and renaming on the engine (`matching`), the expression dialect both
engines read alike (`expressions`), argument checks (`validate`). Imports only `fastkeys.engine`."""
