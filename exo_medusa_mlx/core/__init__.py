"""The framework-neutral layer (numpy alone): trees, the slot map, acceptance, the one Medusa step,
what both backends' models share, streaming, tree growth, checkpoints. Imports no MLX and no torch."""
