"""The iteration-level engine: scheduler + runner, streaming outputs."""
