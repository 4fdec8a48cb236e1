"""The end-to-end small-to-large pipeline: config, content-addressed steps, orchestration."""
