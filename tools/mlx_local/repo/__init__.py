"""The patched checkout: upstream source, mlx-lm-repo/, the patch queue, updates."""
