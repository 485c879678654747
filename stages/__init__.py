"""One module per stage; each exposes `run(cfg, ctx) -> StageResult`."""
