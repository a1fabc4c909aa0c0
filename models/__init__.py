"""What a model is: loaders (GGUF, Hugging Face folders), families, tokenizers, and preparation
(quantizers, residual packer, threshold calibration, artifact store). Launches no kernels."""
