"""The bundled tiny model: its synthetic dataset, its vocabulary and its training script."""
