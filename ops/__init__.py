"""One op per module: a CPU reference and (where it exists) a CUDA kernel with the same signature."""
