"""Models in local-models/: sources, conversion, manifests, listing, the demo model."""
