"""The library layer: settings, images, failures, S3, model store and loading. It imports nothing above it."""
