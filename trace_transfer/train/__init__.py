"""Training: masking API, the shared loop, the sequential runner and its methods."""
