"""Operations scripts: the image smoke test, the container healthcheck (not installed)."""
